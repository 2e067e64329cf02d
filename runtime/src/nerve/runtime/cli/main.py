"""The `nerve` command.

`nerve up` (everything on one host), `nerve demo` (a spike through the whole arc, timed), `nerve facts`,
`nerve keys generate`, `nerve send` (an operator's signed command), `nerve devices` (device identities on
the site broker), `nerve simulate` (a simulated fleet, for load), `nerve runs` and `nerve approve`
(the engine's runs), and one command per part:
`nerve edge`, `nerve bridge`, `nerve central`.
Settings come from `--config` (or `NERVE_CONFIG`), `NERVE_*` variables, then flags. Errors print one
clear line and exit 2; nerve's own errors never show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from nerve.runtime.cli.devices import add_parser as devices_parser
from nerve.runtime.cli.simulate import add_parser as simulate_parser
from nerve.runtime.config.settings import DEFAULT_MAX_COMMAND_VALIDITY_S, load_settings
from nerve.runtime.errors import ConfigError, NerveError
from nerve.runtime.subjects import is_token

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping, Sequence

    from nerve.runtime.config.settings import Settings

log = logging.getLogger("nerve")

EXIT_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130
# `nerve send`: one status per outcome, so scripts can tell them apart. Here, not in nerve.runtime.cli.send:
# building the parser must not import nats-py (an edge-only install has none).
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_REJECTED: Final = 3
EXIT_EXPIRED: Final = 4
EXIT_UNKNOWN: Final = 5
EXIT_TIMEOUT: Final = 6
# A device that sent nothing for this many heartbeats (edge.heartbeat_s) seems offline.
OFFLINE_HEARTBEATS: Final = 2
EXIT_OF_STATUS: Final = {
    "ok": EXIT_OK,
    "failed": EXIT_FAILED,
    "rejected": EXIT_REJECTED,
    "expired": EXIT_EXPIRED,
    "unknown": EXIT_UNKNOWN,
}
#: `nerve runs --state` (nerve.runtime.engine.runs.SHOWN_STATES; here so that the parser imports no nats).
RUN_STATES: Final = ("open", "waiting", "done", "failed", "compensated")
APPROVE_EXIT_HELP: Final = f"""\
exit status:
  {EXIT_OK}  the run took the decision
  {EXIT_FAILED}  the run took another decision, or the approval expired first
  {EXIT_ERROR}  bad arguments, no such run, or nothing to approve (nothing was stored)
  {EXIT_TIMEOUT}  stored, but the run did not take it within --timeout (is an engine running?)
"""
SEND_EXIT_HELP: Final = f"""\
exit status:
  {EXIT_OK}  ok: the device ran the command
  {EXIT_FAILED}  failed: it ran and did not succeed
  {EXIT_ERROR}  bad arguments or settings (nothing was sent)
  {EXIT_REJECTED}  rejected: the device refused it (the reason is printed; "expired: ..." if it came late)
  {EXIT_EXPIRED}  expired: it expired before the bridge could send it
  {EXIT_UNKNOWN}  unknown: the device restarted while running it, and did not run it again
  {EXIT_TIMEOUT}  no result within --timeout (the command may still run until it expires)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C) while waiting: the command may still run until it expires
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML settings file (default: $NERVE_CONFIG)")
    common.add_argument("--mqtt-url", help="mosquitto, e.g. mqtt://127.0.0.1:1883")
    common.add_argument("--nats-url", help="NATS, e.g. nats://127.0.0.1:4222")
    common.add_argument(
        "--log-level",
        default=None,
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="default: info (warning for demo, facts, deadletters)",
    )

    parser = argparse.ArgumentParser(
        prog="nerve",
        description="event-driven agent runtime for edge fleets",
        formatter_class=argparse.RawTextHelpFormatter,  # keeps --version on one line
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", parents=[common], help="run the whole stack on this host")
    _stack_flags(up)
    demo = sub.add_parser("demo", parents=[common], help="inject a disk spike and show the whole arc")
    demo.add_argument("--device", default="demo-01", help="device id (default: demo-01)")
    demo.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each step")
    demo.add_argument("--data-dir", type=Path, help="keep the demo's data here (default: a temp dir)")

    facts = sub.add_parser(
        "facts", parents=[common], help="print the audit facts, newest last (`facts verify`: check the chain)"
    )
    facts.add_argument(
        "check",
        nargs="?",
        choices=("verify",),
        help="verify: prove the chain intact or name each fact altered, removed, moved or forged (exit 1)",
    )
    facts.add_argument("--device", help="only this device's facts")
    facts.add_argument("--limit", type=int, default=0, help="only the last N facts")
    facts.add_argument(
        "--keys",
        type=Path,
        help="trusted public key file, or a directory of <keyid>.pub (default: the central key's .pub)",
    )
    dead = sub.add_parser("deadletters", parents=[common], help="print what could not be handled, and why")
    dead.add_argument("--limit", type=int, default=0, help="only the last N")

    keys = sub.add_parser("keys", help="signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = keys_sub.add_parser("generate", help="write an Ed25519 key pair")
    generate.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write (default: where up, send, facts and devices look: $XDG_CONFIG_HOME/nerve/keys, "
        "or ~/.config/nerve/keys)",
    )
    generate.add_argument("--keyid", default="central", help="key id and file stem (default: central)")
    generate.add_argument("--force", action="store_true", help="replace existing key files")

    send = sub.add_parser(
        "send",
        parents=[common],
        help="sign a command, send it to a device, print its result",
        description="Sign ACTION for DEVICE with the central key, send it through JetStream and the "
        "bridge, wait for the device's result and print it.",
        epilog=SEND_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("device", metavar="DEVICE", help="device id")
    send.add_argument("action", metavar="ACTION", help="action name, e.g. clear_temp")
    send.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an argument (repeatable); VALUE is read as JSON if it is JSON (3600, true), else as text",
    )
    send.add_argument(
        "--expires-in",
        default="60s",
        help=f"how long the command is valid (default: 60s; at most {DEFAULT_MAX_COMMAND_VALIDITY_S:g}s, "
        "the longest a device accepts by default: edge.max_command_validity_s)",
    )
    send.add_argument("--timeout", help="how long to wait for the result (default: the expiry plus 10s)")
    send.add_argument(
        "--key",
        type=Path,
        help="private key to sign with (default: central.signing_key, else the key `nerve up` made: "
        "$XDG_CONFIG_HOME/nerve/keys/<keyid>.key, or ~/.config/nerve/keys/<keyid>.key)",
    )
    send.add_argument("--json", action="store_true", help="print the whole result as JSON")

    runs, approve = _runs_parsers(sub, common)
    devices_parser(sub, common)
    simulate_parser(sub, common)
    streams = sub.add_parser("streams", parents=[common], help="JetStream streams and buckets (admin)")
    streams.add_argument(
        "streams_command",
        choices=("apply",),
        metavar="ACTION",
        help="apply: create them or bring them to their configured limits, as the admin identity "
        "(nats.nkey_file, else <data_dir>/nats/admin.nk)",
    )
    nats_config = sub.add_parser(
        "nats-config",
        parents=[common],
        help="print nats-server's config for nerve's identities (made under <data_dir>/nats/ if missing)",
    )
    nats_config.add_argument("--nkeys", action="store_true", help="print the public keys file it includes")
    nats_config.add_argument("--listen", default="127.0.0.1:4222", help="default: 127.0.0.1:4222")
    nats_config.add_argument("--store-dir", default="/var/lib/nerve/jetstream", help="JetStream's store")
    for operator in (facts, dead, send, streams, nats_config, runs, approve):  # nerve up's identities there
        operator.add_argument(
            "--data-dir", type=Path, help="where <data_dir>/nats/ holds the NATS identities (default: .nerve)"
        )

    edge = sub.add_parser("edge", parents=[common], help="run the device daemon")
    edge.add_argument("--device", help="device id (default: the host name)")
    sub.add_parser("bridge", parents=[common], help="run the MQTT <-> JetStream bridge")
    sub.add_parser("central", parents=[common], help="run the central agents")
    return parser


def _runs_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """`nerve runs` and `nerve approve`."""
    runs = sub.add_parser(
        "runs",
        parents=[common],
        help="the engine's runs: list them, `show RUN_ID` (each step), `cancel RUN_ID` (its undos run)",
    )
    runs.add_argument("runs_action", nargs="?", metavar="ACTION", help="show or cancel (none: list the runs)")
    runs.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (show, cancel)")
    runs.add_argument("--state", choices=RUN_STATES, help="only runs in this state (list)")
    runs.add_argument("--json", action="store_true", help="one JSON document per run")
    approve = sub.add_parser(
        "approve",
        parents=[common],
        help="approve (or --reject) a run's pending approval, signed with the operator's key",
        epilog=APPROVE_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    approve.add_argument("run_id", metavar="RUN_ID", help="the run waiting for a decision")
    approve.add_argument("--reject", action="store_true", help="reject instead of approve")
    approve.add_argument("--comment", default="", help="why (kept in the journal and the fact)")
    approve.add_argument(
        "--key",
        type=Path,
        help="private key to sign with (default: operator.key in the keys directory if it exists, "
        "else the key `nerve send` uses)",
    )
    approve.add_argument("--timeout", default="10s", help="how long to wait for the run to take it (10s)")
    return runs, approve


PARTS: Final = ("nerve-runtime", "nerve-edge", "nerve-bridge", "nerve-agents")


class _VersionAction(argparse._VersionAction):  # noqa: SLF001 - argparse's own, output kept as it was
    """`--version`: `version_line()`, looked up only when asked, not each time the parser is built."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        self.version = version_line()
        super().__call__(parser, namespace, values, option_string)


def version_line() -> str:
    """`nerve 0.1.0 (nerve-runtime 0.1.0, nerve-edge 0.1.0, ...)`: the installed distributions' versions."""
    import importlib.metadata  # noqa: PLC0415 - ~15 ms: only for --version, not at every start

    installed = []
    for name in PARTS:
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        product = importlib.metadata.version("nerve")
    except importlib.metadata.PackageNotFoundError:
        product = installed[0].split()[1] if installed else "(not installed)"
    return f"nerve {product} ({', '.join(installed)})" if installed else f"nerve {product}"


def runnable(program: Path, *, cwd: Path, on_path: str | None) -> str:
    """How a person can type `program` in `cwd`.

    Its bare name if `on_path` (what PATH finds under that name) is this very file; else the shorter of
    its absolute path and its path relative to `cwd` (only below `cwd`: `.venv/bin/nerve`).
    """
    absolute = _absolute(program, cwd)
    if on_path is not None and _absolute(Path(on_path), cwd) == absolute:
        return program.name
    return shown_path(absolute, cwd=cwd)


def _absolute(path: Path, cwd: Path) -> Path:
    # normpath, not resolve(): a venv's bin/ may be a symlink, and the path typed is the one to show.
    return Path(os.path.normpath(cwd / path))


def shown_path(path: Path, *, cwd: Path) -> str:
    """`path` relative to `cwd` when it is below it and that is shorter, else absolute."""
    absolute = _absolute(path, cwd)
    if absolute.is_relative_to(cwd):
        relative = str(absolute.relative_to(cwd))
        if relative != "." and len(relative) < len(str(absolute)):
            return relative
    return str(absolute)


def _this_program() -> str:
    program = Path(sys.argv[0])
    if program.name != "nerve":  # python -m nerve.runtime.cli.main
        program = Path(sys.executable).parent / "nerve"
    return runnable(program, cwd=Path.cwd(), on_path=shutil.which(program.name))


def _stack_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="this host's device id (default: the host name)")
    parser.add_argument("--mqtt-port", type=int, help="mosquitto port on 127.0.0.1 (default: 1883)")
    parser.add_argument("--nats-port", type=int, help="NATS port on 127.0.0.1 (default: 4222)")
    parser.add_argument("--data-dir", type=Path, help="brokers' data, keys, scratch (default: .nerve)")


# Arguments that end up in a NATS subject or an MQTT topic (or, for a key id, a file name): each must be
# a token. Checked before anything else, so that `--device '>'` never becomes a wildcard and `a.b` never
# an extra subject level. Attribute -> how the command line names it.
TOKEN_ARGUMENTS: Final = {"device": "--device", "action": "ACTION", "keyid": "--keyid"}
POSITIONAL_DEVICE: Final = "DEVICE"


def check_arguments(args: argparse.Namespace) -> None:
    """Raise `ConfigError` naming the first flag whose value cannot be used as given."""
    for attribute, flag in TOKEN_ARGUMENTS.items():
        value = getattr(args, attribute, None)
        if value is None:
            continue
        name = POSITIONAL_DEVICE if attribute == "device" and args.command == "send" else flag
        if not is_token(value):
            what = "key id" if attribute == "keyid" else attribute if attribute == "action" else "device id"
            raise ConfigError(
                f"{value!r} is not a valid {what}: use 1 to 64 of A-Z a-z 0-9 _ - (no wildcards, no dots)",
                source="command line",
                key=name,
            )
    if getattr(args, "limit", 0) < 0:
        raise ConfigError(
            f"{args.limit} is not a count: use 0 (all) or more", source="command line", key="--limit"
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "mqtt_url", None):
        overrides.setdefault("mqtt", {})["url"] = args.mqtt_url
    if getattr(args, "nats_url", None):
        overrides.setdefault("nats", {})["url"] = args.nats_url
    if getattr(args, "mqtt_port", None):
        overrides.setdefault("mqtt", {})["url"] = f"mqtt://127.0.0.1:{args.mqtt_port}"
    if getattr(args, "nats_port", None):
        overrides.setdefault("nats", {})["url"] = f"nats://127.0.0.1:{args.nats_port}"
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = str(args.data_dir)
    return overrides


def _settings(args: argparse.Namespace) -> Settings:
    config = args.config or (Path(os.environ["NERVE_CONFIG"]) if os.environ.get("NERVE_CONFIG") else None)
    return load_settings(config, env=os.environ, overrides=_overrides(args))


async def _up(args: argparse.Namespace) -> int:
    from nerve.runtime.pauses import freeze_survivors  # noqa: PLC0415
    from nerve.runtime.stack.local import Stack  # noqa: PLC0415 - needs every part installed

    settings = _settings(args)
    device = args.device or settings.edge.device or _default_device()
    key = settings.central.signing_key or default_keys_dir(os.environ) / f"{settings.central.keyid}.key"
    # The device's key and the registry are the data dir's (`<data_dir>/devices`, as for `nerve devices`
    # and `nerve send --data-dir`), unless the settings name them.
    async with Stack(settings=settings, device=device, signing_key=key) as stack:
        info = stack.info
        assert info is not None  # noqa: S101 - set by __aenter__
        started = f" (started: {', '.join(info.started_brokers)})" if info.started_brokers else ""
        cwd = Path.cwd()
        nerve = _this_program()
        # One line that says it is ready and what to type; details after it. Every command and path is
        # as it can be typed here: `make run` does not put nerve on the PATH.
        print(f"nerve is up: device {info.device}; try: {info.try_command(settings.prefix)}", flush=True)
        # Its own nats-server lets in only nerve's identities: the cli's is under the data dir.
        own_nats = "nats-server" in info.started_brokers and settings.data_dir != Path(".nerve")
        where = f" --data-dir {shown_path(info.data_dir, cwd=cwd)}" if own_nats else ""
        print(
            f"  mqtt {info.mqtt_host}:{info.mqtt_port}, nats {info.nats_url}, "
            f"data {shown_path(info.data_dir, cwd=cwd)}{started}\n"
            f"  then: {nerve} facts --nats-url {info.nats_url}{where}   (and: {nerve} deadletters{where})\n"
            f"  clear_temp cleans only {shown_path(info.scratch, cwd=cwd)}. Ctrl-C stops everything.",
            flush=True,
        )
        if "mosquitto" in info.started_brokers:
            print(LOOPBACK_BROKER_LINE.format(nerve=nerve), flush=True)
        freeze_survivors()  # every part is up: shorter collector pauses from here on (nerve.runtime.pauses)
        await stack.wait()
    return 0


# What `nerve up` says when it started its own mosquitto: easy on this host, not for devices on a network.
LOOPBACK_BROKER_LINE: Final = (
    "  its mosquitto listens on 127.0.0.1 only and takes anonymous clients (dev mode); for devices on the "
    "network run a site broker: configs/mosquitto-site.conf and `{nerve} devices add ID` (docs/devices.md)"
)


def _default_device() -> str:
    from nerve.edge.agent import default_device_id  # noqa: PLC0415

    return default_device_id()


async def _demo(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.demo import run_demo  # noqa: PLC0415

    return await run_demo(
        base=load_settings(
            args.config, env={}, overrides={k: v for k, v in _overrides(args).items() if k != "data_dir"}
        ),
        device=args.device,
        timeout=args.timeout,
        data_dir=args.data_dir,
    )


async def _facts(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.history import fact_verifier, print_facts, verify_facts  # noqa: PLC0415
    from nerve.runtime.trust.signing import PRIVATE_SUFFIX, PUBLIC_SUFFIX  # noqa: PLC0415

    if args.check == "verify" and (args.device is not None or args.limit):
        flag = "--device" if args.device is not None else "--limit"
        raise ConfigError("verify checks the whole chain (a link spans devices)", key=flag)
    settings = _cli_settings(args)
    keys = args.keys or settings.central.signing_key
    keys = keys or default_keys_dir(os.environ) / f"{settings.central.keyid}{PRIVATE_SUFFIX}"
    if args.check == "verify":
        return await verify_facts(settings, fact_verifier(settings, keys))
    # Plain listing: unverified (and said so) when no key was named and the default one does not exist.
    known = args.keys is not None or keys.with_suffix(PUBLIC_SUFFIX).exists()
    verifier = fact_verifier(settings, keys) if known else None
    return await print_facts(settings, device=args.device, limit=args.limit, verifier=verifier)


async def _deadletters(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.history import print_dead_letters  # noqa: PLC0415

    return await print_dead_letters(_cli_settings(args), limit=args.limit)


def default_keys_dir(env: Mapping[str, str]) -> Path:
    """Where `nerve up` keeps the central key, and `nerve send` finds it, when settings name none.

    `$XDG_CONFIG_HOME/nerve/keys`, else `~/.config/nerve/keys`: one place per user, whatever the
    working directory or `--data-dir`, so that `nerve send` signs with the key `nerve up` trusts.
    """
    config = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(config) / "nerve" / "keys"


async def _send(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see main()

    from nerve.runtime.cli.send import (  # noqa: PLC0415
        CommandChannel,
        device_registry,
        format_result,
        parse_args,
        parse_duration,
        parse_expires_in,
        presence_notice,
        sign_command,
        signer_for,
        signing_key_path,
    )
    from nerve.runtime.envelope.codec import to_json  # noqa: PLC0415

    # Everything is checked before anything is sent.
    arguments = parse_args(args.arg)
    expires_in = parse_expires_in(args.expires_in)
    timeout = parse_duration(args.timeout, flag="--timeout") if args.timeout else expires_in + 10.0
    settings = _cli_settings(args)
    keys_dir = default_keys_dir(os.environ)
    key_path, default_key = signing_key_path(settings, args.key, keys_dir)
    signer = signer_for(settings, args.key, keys_dir)
    if not default_key:
        _tell(f"signing with {key_path} (key id {signer.keyid})")
    command = sign_command(
        signer, device=args.device, action=args.action, args=arguments, expires_in=expires_in
    )
    expires = command.expires.isoformat(timespec="seconds")
    sent = False
    started = time.monotonic()
    try:
        async with CommandChannel(settings, registry=device_registry(settings)) as channel:
            await channel.send(command, device=args.device)
            sent = True
            notice = presence_notice(
                args.device,
                await channel.last_seen(args.device),
                now=datetime.now(UTC),
                offline_after_s=OFFLINE_HEARTBEATS * settings.edge.heartbeat_s,
            )
            if notice:
                _tell(f"{notice}; waiting up to {timeout:g}s for a result")
            result = await channel.result(
                command, timeout=max(0.0, timeout - (time.monotonic() - started)), ignored=_tell
            )
    except asyncio.CancelledError:
        what = f"command {command.id} was sent and may still run until {expires}" if sent else "nothing sent"
        _tell(f"interrupted: {what}")
        return EXIT_INTERRUPTED
    if result is None:
        _tell(
            f"no result from {args.device} within {timeout:g}s (command {command.id}); "
            f"it may still run until it expires at {expires}"
        )
        return EXIT_TIMEOUT
    print(to_json(result).decode() if args.json else format_result(result), flush=True)
    if result.status == "rejected" and any(word in result.reason for word in ("signature", "key id")):
        _tell(f"it was signed with {key_path} (key id {signer.keyid}); is that the key {args.device} trusts?")
    return EXIT_OF_STATUS[result.status]


def _tell(line: str) -> None:
    """One line from `nerve send` to stderr (stdout is for the result)."""
    print(f"nerve send: {line}", file=sys.stderr, flush=True)


def _edge(args: argparse.Namespace) -> int:
    """Validate the settings here, then become the lean edge process (same PID: systemd-friendly).

    pydantic, which validates the settings, costs the daemon ~10 MiB of RSS for as long as it runs:
    `nerve.edge.main` gets the validated settings as JSON and never imports it. See edge/README.md.
    """
    from nerve.edge.main import HANDOVER_VARIABLE, handover  # noqa: PLC0415

    settings = _settings(args)
    os.environ[HANDOVER_VARIABLE] = handover(settings, device=args.device, log_level=args.log_level)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "nerve.edge.main"])  # noqa: S606 - our own interpreter


async def _bridge(args: argparse.Namespace) -> int:
    from nerve.bridge import Bridge  # noqa: PLC0415
    from nerve.runtime.pauses import frozen_once_ready  # noqa: PLC0415

    bridge = Bridge(settings=_settings(args))
    async with frozen_once_ready(bridge.ready):  # shorter collector pauses once started
        await bridge.run()
    return 0


async def _central(args: argparse.Namespace) -> int:
    from nerve.agents import builtin_agents, builtin_durable_agents  # noqa: PLC0415
    from nerve.runtime.central.runner import Central  # noqa: PLC0415
    from nerve.runtime.errors import ConfigError  # noqa: PLC0415
    from nerve.runtime.pauses import frozen_once_ready  # noqa: PLC0415
    from nerve.runtime.trust.signing import Signer  # noqa: PLC0415

    settings = _settings(args)
    if settings.central.signing_key is None:
        msg = "central needs a signing key: set central.signing_key (see `nerve keys generate`)"
        raise ConfigError(msg, key="central.signing_key")
    signer = Signer.from_file(settings.central.signing_key, settings.central.keyid)
    central = Central(
        settings=settings,
        signer=signer,
        agents=builtin_agents(settings),
        durable=builtin_durable_agents(settings),
    )
    async with frozen_once_ready(central.ready):  # shorter collector pauses once started
        await central.run()
    return 0


async def _streams(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.natscmd import streams_apply  # noqa: PLC0415

    return await streams_apply(_settings(args))


async def _simulate(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.simulate import run  # noqa: PLC0415

    return await run(args, _cli_settings(args))


async def _nats_config(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.natscmd import nats_config  # noqa: PLC0415

    return nats_config(_settings(args), nkeys=args.nkeys, listen=args.listen, store_dir=args.store_dir)


def _cli_settings(args: argparse.Namespace) -> Settings:
    """The settings of an operator's command: as the cli identity `nerve up` made, if there is one."""
    from nerve.runtime.stack.natsauth import cli_identity  # noqa: PLC0415

    return cli_identity(_settings(args))


def _keys(args: argparse.Namespace) -> int:
    from nerve.runtime.trust.signing import generate_keypair  # noqa: PLC0415

    directory = args.dir if args.dir is not None else default_keys_dir(os.environ)
    private, public = generate_keypair(directory, args.keyid, overwrite=args.force)
    print(f"wrote {private} (private, mode 0600: central signs with it)")
    print(f"wrote {public} (public: give it to devices as a trusted key)")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.devices import run  # noqa: PLC0415

    return run(args, _settings(args), keys_dir=default_keys_dir(os.environ))


async def _runs(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.runs import cancel_run, print_runs, show_run  # noqa: PLC0415
    from nerve.runtime.engine.runs import check_run_id  # noqa: PLC0415

    action = args.runs_action
    if action not in {None, "show", "cancel"}:
        raise ConfigError(
            f"{action!r}: say `show RUN_ID` or `cancel RUN_ID` (or nothing: the list)", key="ACTION"
        )
    if args.run_id is not None:
        check_run_id(args.run_id)
    if action is not None and args.run_id is None:
        raise ConfigError(f"`nerve runs {action}` needs a RUN_ID", key="RUN_ID")
    if action is not None and args.state is not None:
        raise ConfigError("--state filters the list, not one run", key="--state")
    settings = _cli_settings(args)
    if action == "show":
        return await show_run(settings, args.run_id, as_json=args.json)
    if action == "cancel":
        return await cancel_run(settings, args.run_id)
    return await print_runs(settings, state=args.state, as_json=args.json)


async def _approve(args: argparse.Namespace) -> int:
    from nerve.runtime.cli.runs import approve_run, operator_signer  # noqa: PLC0415
    from nerve.runtime.cli.send import parse_duration  # noqa: PLC0415
    from nerve.runtime.engine.runs import check_run_id  # noqa: PLC0415

    check_run_id(args.run_id)
    timeout = parse_duration(args.timeout, flag="--timeout")
    settings = _cli_settings(args)
    signer = operator_signer(settings, args.key, default_keys_dir(os.environ))
    return await approve_run(
        settings, args.run_id, signer=signer, reject=args.reject, comment=args.comment, timeout=timeout
    )


COMMANDS: Final[dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]]] = {
    "up": _up,
    "demo": _demo,
    "facts": _facts,
    "deadletters": _deadletters,
    "send": _send,
    "bridge": _bridge,
    "central": _central,
    "streams": _streams,
    "nats-config": _nats_config,
    "simulate": _simulate,
    "runs": _runs,
    "approve": _approve,
}


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - a return per kind of command
    """Entry point of the `nerve` command; returns the exit status."""
    args = _parser().parse_args(argv)
    quiet = args.command in {
        "demo",
        "facts",
        "deadletters",
        "keys",
        "send",
        "devices",
        "streams",
        "nats-config",
        "simulate",
        "runs",
        "approve",
    }
    level = (getattr(args, "log_level", None) or ("warning" if quiet else "info")).upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        check_arguments(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "edge":
            return _edge(args)
        if args.command == "devices":
            return _devices(args)
        # Here, not at the top: `nerve edge` execs the lean edge process and never needs asyncio (~25 ms).
        import asyncio  # noqa: PLC0415

        from nerve.runtime.cancellation import until_signalled  # noqa: PLC0415

        return asyncio.run(until_signalled(COMMANDS[args.command](args)))
    except NerveError as exc:
        print(f"nerve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith(("nerve.", "nats")):
            raise
        print(
            f"nerve {args.command}: error: {exc.name} is not installed (install the full `nerve` package)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
