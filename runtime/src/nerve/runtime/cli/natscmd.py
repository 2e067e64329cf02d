"""`nerve streams apply` and `nerve nats-config`: NATS set up for least privilege (docs/nats.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nerve.runtime.errors import shown_url
from nerve.runtime.jetstream.client import connect, identity_of
from nerve.runtime.jetstream.identities import ensure_identities, identities_dir
from nerve.runtime.jetstream.permissions import nkey_variables, server_config
from nerve.runtime.jetstream.streams import apply_streams, storage_names
from nerve.runtime.stack.natsauth import admin_identity

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings


async def streams_apply(settings: Settings) -> int:
    """Create every stream and bucket, or bring it to the configured limits, as the admin identity.

    The identity: `nats.nkey_file`, else `<data_dir>/nats/admin.nk`, else none (a server without
    authentication). Raises `StreamShrinkRefused` for a limit that would drop facts, `NatsAuthRefused`.
    """
    admin = admin_identity(settings)
    nc = await connect(admin.nats, name="nerve-streams")
    try:
        await apply_streams(nc.jetstream(), settings.prefix, settings.streams, settings.central.engine)
    finally:
        await nc.close()
    names = storage_names()
    print(f"applied {', '.join(names)} on {shown_url(admin.nats.url)} as {identity_of(admin.nats)}")
    return 0


def nats_config(settings: Settings, *, nkeys: bool, listen: str, store_dir: str) -> int:
    """Print nats-server's configuration for nerve (or, with `nkeys`, the public keys file it includes).

    Creates the identities missing under `<data_dir>/nats/` first (seeds 0600): each part is then given
    its seed file as `nats.nkey_file`.
    """
    directory = identities_dir(settings.data_dir)
    keys = ensure_identities(directory)
    if nkeys:
        print(nkey_variables({identity: key.public_key for identity, key in keys.items()}), end="")
    else:
        print(server_config(prefix=settings.prefix, listen=listen, store_dir=store_dir), end="")
    return 0
