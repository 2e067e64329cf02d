"""Least privilege for the nats-server `nerve up` starts itself: identities, its config, stream setup.

Under `<data_dir>/nats/`: one nkey seed per identity (`admin.nk`, `bridge.nk`, `central.nk`, `cli.nk`,
mode 0600, made once and kept), `nerve-nkeys.conf` (their public keys) and `nats-server.conf` (the
generated configuration, `permissions.server_config`). The stack starts nats-server with it, creates
the streams and buckets as admin, and runs central and the bridge each as its own identity; the cli
commands find `cli.nk` there by default. See docs/nats.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nerve.runtime.jetstream.client import connect
from nerve.runtime.jetstream.identities import Identity, ensure_identities, identities_dir, seed_path
from nerve.runtime.jetstream.permissions import NKEYS_FILE, nkey_variables, server_config
from nerve.runtime.jetstream.streams import apply_streams

if TYPE_CHECKING:
    from pathlib import Path

    from nerve.runtime.config.settings import Settings

log = logging.getLogger(__name__)

CONFIG_FILE: Final = "nats-server.conf"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def as_identity(settings: Settings, identity: Identity, directory: Path) -> Settings:
    """`settings` with NATS reached as `identity`, whose seed is in `directory`."""
    nats = settings.nats.model_copy(update={"nkey_file": seed_path(directory, identity)})
    return settings.model_copy(update={"nats": nats})


def cli_identity(settings: Settings) -> Settings:
    """The settings a cli command connects with: `nats.nkey_file`, else `<data_dir>/nats/cli.nk` if present.

    So that `nerve send`, `nerve facts` and the rest work against the server `nerve up` started, and
    against a server without authentication as before (no seed there: no identity).
    """
    if settings.nats.nkey_file is not None:
        return settings
    directory = identities_dir(settings.data_dir)
    if not seed_path(directory, Identity.CLI).exists():
        return settings
    return as_identity(settings, Identity.CLI, directory)


def admin_identity(settings: Settings) -> Settings:
    """The settings `nerve streams apply` connects with: `nats.nkey_file`, else `<data_dir>/nats/admin.nk`."""
    if settings.nats.nkey_file is not None:
        return settings
    directory = identities_dir(settings.data_dir)
    if not seed_path(directory, Identity.ADMIN).exists():
        return settings
    return as_identity(settings, Identity.ADMIN, directory)


@dataclass(frozen=True, slots=True)
class LocalNats:
    """The identities and config of a nats-server started by `nerve up`."""

    directory: Path

    @property
    def config_file(self) -> Path:
        """The generated nats-server configuration."""
        return self.directory / CONFIG_FILE

    @classmethod
    def prepare(cls, data_dir: Path, *, prefix: str, port: int, store_dir: Path) -> LocalNats:
        """Create the missing seeds under `<data_dir>/nats/` and (re)write the server's config there."""
        directory = identities_dir(data_dir)
        keys = ensure_identities(directory)
        _write_private(directory / NKEYS_FILE, nkey_variables({i: k.public_key for i, k in keys.items()}))
        config = server_config(prefix=prefix, listen=f"127.0.0.1:{port}", store_dir=str(store_dir), http=None)
        _write_private(directory / CONFIG_FILE, config)
        return cls(directory)

    def part(self, settings: Settings, identity: Identity | str) -> Settings:
        """`settings` for the part that runs as `identity` (`"central"` will do: callers import lazily)."""
        return as_identity(settings, Identity(identity), self.directory)

    async def apply_streams(self, settings: Settings) -> None:
        """Create (or bring to their limits) every stream and bucket, as admin."""
        nc = await connect(self.part(settings, Identity.ADMIN).nats, name="nerve-streams")
        try:
            await apply_streams(nc.jetstream(), settings.prefix, settings.streams, settings.central.engine)
        finally:
            await nc.close()
        log.info("nats: streams and buckets set up as admin (identities in %s)", self.directory)
