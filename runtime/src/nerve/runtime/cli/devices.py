"""`nerve devices`: provision, list and revoke the devices of a site broker (nerve.runtime.trust.site).

Nothing secret is ever printed: passwords and private keys go to 0600 files only, and the output names
those files. See docs/devices.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings
    from nerve.runtime.trust.site import AddedBridge, Reload, SetUp, Site


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """`nerve devices {add,list,revoke,site,bridge}` under the `nerve` command's subcommands."""
    devices = sub.add_parser(
        "devices", help="device identities on the site broker: add, list, revoke (docs/devices.md)"
    )
    actions = devices.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    shared = _shared(common)
    add = actions.add_parser(
        "add", parents=[shared], help="provision a device: broker login, key pair, a bundle to copy to it"
    )
    add.add_argument("device_id", metavar="ID", help="the device id (1-64 of A-Z a-z 0-9 _ -)")
    add.add_argument("--force", action="store_true", help="replace an existing device's login and key")
    add.add_argument(
        "--central-key",
        type=Path,
        help="central's public key the device will trust (.pub, or the .key beside it; default: "
        "central.signing_key's, else the key `nerve up` made)",
    )
    listing = actions.add_parser(
        "list", parents=[shared], help="every device: added, revoked, key fingerprint"
    )
    listing.add_argument("--json", action="store_true", help="as a JSON list")
    revoke = actions.add_parser(
        "revoke", parents=[shared], help="revoke a device: the broker refuses (and disconnects) it"
    )
    revoke.add_argument("device_id", metavar="ID", help="the device id")
    site = actions.add_parser(
        "site",
        parents=[shared],
        help="set up the site (CA, broker certificate, the bridge's logins) and print the bridge's settings",
    )
    _site_options(site)
    # `nerve devices bridge` alone is `site` (as it always was); with an action, it keeps named bridges,
    # each with logins of its own, for several bridges in a $share group.
    bridge = actions.add_parser(
        "bridge",
        parents=[shared],
        help="`site`; or, with add/list/revoke, bridges of a $share group, each with its own logins",
    )
    _site_options(bridge)
    bridges = bridge.add_subparsers(dest="bridge_command", metavar="ACTION")
    # Options given after the action must not reset those given before it to their defaults.
    nested = _without_defaults(shared)
    bridge_add = bridges.add_parser(
        "add", parents=[nested], help="make a bridge's two logins and its bundle (settings, passwords)"
    )
    bridge_add.add_argument("name", metavar="NAME", help="the bridge's name (1-64 of A-Z a-z 0-9 _ -)")
    bridge_add.add_argument(
        "--dir",
        type=Path,
        help="where the bundle will be on the bridge's host (default: where it is written here)",
    )
    bridge_add.add_argument("--force", action="store_true", help="give an existing bridge new passwords")
    bridge_list = bridges.add_parser(
        "list", parents=[nested], help="the named bridges: logins, added, revoked"
    )
    bridge_list.add_argument("--json", action="store_true", help="as a JSON list")
    bridge_revoke = bridges.add_parser(
        "revoke",
        parents=[nested],
        help="revoke a bridge: its logins go, and its session leaves the $share group",
    )
    bridge_revoke.add_argument("name", metavar="NAME", help="the bridge's name")


def _site_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--renew", action="store_true", help="issue a new broker certificate")
    parser.add_argument(
        "--new-bridge-password",
        action="store_true",
        help="give the bridge new passwords (its uplink's and downlink's)",
    )


def _without_defaults(parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parent`'s options with no defaults, for a nested subcommand.

    argparse copies every attribute a subcommand's parser sets over the outer namespace, defaults
    included: `nerve devices bridge --config x add a` would lose `--config` to the nested default.
    """
    suppressed = argparse.ArgumentParser(add_help=False)
    for action in parent._actions:  # noqa: SLF001 - argparse has no public way to copy options
        clone = copy.copy(action)
        clone.default = argparse.SUPPRESS
        suppressed._add_action(clone)  # noqa: SLF001
    return suppressed


def _shared(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False, parents=[common])
    shared.add_argument("--data-dir", type=Path, help="where the site's files are (default: .nerve)")
    shared.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="the broker's host name or IP, for its certificate and devices' URL (repeatable; "
        "default: site.hosts, else the hosts given before)",
    )
    return shared


def run(args: argparse.Namespace, settings: Settings, *, keys_dir: Path) -> int:
    """Run `nerve devices ACTION` and return the exit status; `keys_dir` is where `nerve up` keeps keys.

    Raises `NerveError` (one line) for what it refuses.
    """
    # Imported here, not at the top: every `nerve` command builds this parser, and the site module (yaml,
    # file locks, certificates) would add ~55 ms to each start, `nerve edge` included.
    from nerve.runtime.trust.site import Site, SiteError  # noqa: PLC0415

    try:
        site = Site(settings, hosts=args.host)
        if args.devices_command == "add":
            return _add(site, settings, args, keys_dir)
        if args.devices_command == "list":
            return _list(site, as_json=args.json)
        if args.devices_command == "revoke":
            moved = site.revoke(args.device_id)
            print(f"revoked {args.device_id}: its login is gone; its public key moved to {_shown(moved)}")
            _reload(site)
            return 0
        bridge_command = getattr(args, "bridge_command", None)
        if bridge_command is not None:
            return _bridge(site, args, bridge_command)
        return _site(site, renew=args.renew, new_bridge_password=args.new_bridge_password)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("cryptography"):
            raise
        raise SiteError(
            "the cryptography package is not installed: `pip install './runtime[site]'` (`nerve` has it)"
        ) from None


def _shown(path: Path) -> str:
    cwd = Path.cwd()
    absolute = path.absolute()
    return str(absolute.relative_to(cwd)) if absolute.is_relative_to(cwd) else str(absolute)


def _made(setup: SetUp) -> None:
    for line in setup.made:
        print(f"made {line}")


def _reload(site: Site) -> None:
    outcome: Reload = site.reload_broker()
    print(outcome.message if outcome.sent else f"the broker still has the old files: {outcome.message}")


def _add(site: Site, settings: Settings, args: argparse.Namespace, keys_dir: Path) -> int:
    from nerve.runtime.trust.site import BUNDLE_CONFIG  # noqa: PLC0415 - see `run`

    central = args.central_key or settings.central.signing_key or keys_dir / f"{settings.central.keyid}.key"
    added = site.add(args.device_id, central_public_key=central, force=args.force)
    _made(added.setup)
    device, target = added.device, settings.site.device_dir
    bundle = shlex.quote(_shown(added.bundle))
    print(
        f"added {device}: broker login {device!r} on {added.url}, key {added.fingerprint}\n"
        f"  central checks its results with {_shown(added.public_key)}\n"
        f"  its bundle (the device's private key and password, mode 0700): {_shown(added.bundle)}\n"
        f"copy the bundle to {device} as {target} (the paths in its {BUNDLE_CONFIG} are there):\n"
        f"  scp -rp {bundle} root@{device}:{target}      ({target} must not exist there yet)\n"
        f"  on {device}, if the edge runs as user nerve: chown -R nerve: {target}\n"
        f"start the edge with it, on {device}:\n"
        f"  nerve edge --config {target / BUNDLE_CONFIG}\n"
        f"then delete the bundle here: rm -r {bundle}"
    )
    _reload(site)
    return 0


def _list(site: Site, *, as_json: bool) -> int:
    devices = site.devices()
    if as_json:
        print(json.dumps([dataclasses.asdict(d) for d in devices], indent=2))
        return 0
    if not devices:
        print(f"no devices on this site yet (`nerve devices add ID`; site files: {_shown(site.paths.root)})")
        return 0
    width = max(len("ID"), *(len(d.device) for d in devices))
    print(f"{'ID':<{width}}  {'ADDED':<25}  {'STATUS':<33}  KEY")
    for d in devices:
        status = f"revoked {d.revoked}" if d.revoked else "active"
        print(f"{d.device:<{width}}  {d.added:<25}  {status:<33}  {d.fingerprint}")
    return 0


def _bridge(site: Site, args: argparse.Namespace, command: str) -> int:
    if command == "add":
        added = site.add_bridge(args.name, directory=args.dir, force=args.force)
        _made(added.setup)
        _print_added_bridge(added, directory=args.dir)
        _reload(site)
        return 0
    if command == "list":
        return _list_bridges(site, as_json=args.json)
    import asyncio  # noqa: PLC0415 - only here: every nerve command builds this parser (nerve edge too)

    revoked = asyncio.run(site.revoke_bridge(args.name))
    had = "" if revoked.session_found else " (it had none: the bridge never connected)"
    print(
        f"revoked bridge {revoked.name}: its logins {revoked.username!r} and {revoked.downlink_username!r} "
        f"are gone, and its session left the site's $share group{had}: the group's other bridges take "
        "the whole uplink"
    )
    for reload in revoked.reloads:
        print(reload.message if reload.sent else f"the broker still has the old files: {reload.message}")
    return 0


def _print_added_bridge(added: AddedBridge, *, directory: Path | None) -> None:
    bundle, config = shlex.quote(_shown(added.bundle)), _shown(added.config)
    print(
        f"added bridge {added.name} to the site's $share group: logins {added.username!r} (uplink) and "
        f"{added.downlink_username!r} (downlink) on {added.url}\n"
        f"  its bundle (its two passwords and the site CA, mode 0700): {_shown(added.bundle)}\n"
        f"  its settings: {config} (add its nats settings to it; no password in it, but keep the group's "
        "name in it to the bridges)"
    )
    if directory is None:
        print(f"run it on this host:\n  nerve bridge --config {shlex.quote(config)}")
    else:
        print(
            f"copy the bundle to the bridge's host as {directory} (the paths in its settings are there):\n"
            f"  scp -rp {bundle} root@BRIDGE-HOST:{directory}\n"
            f"then run it there: nerve bridge --config {directory / added.config.name}"
        )


def _list_bridges(site: Site, *, as_json: bool) -> int:
    bridges = site.bridges()
    if as_json:
        print(json.dumps([dataclasses.asdict(b) for b in bridges], indent=2))
        return 0
    if not bridges:
        print("no named bridges on this site yet (`nerve devices bridge add NAME`)")
        return 0
    name_width = max(len("NAME"), *(len(b.name) for b in bridges))
    login_width = max(len("LOGIN"), *(len(b.username) for b in bridges))
    print(f"{'NAME':<{name_width}}  {'LOGIN':<{login_width}}  {'ADDED':<25}  STATUS")
    for b in bridges:
        if b.revoked is None:
            status = "active"
        elif b.left:
            status = f"revoked {b.revoked}"
        else:
            status = f"revoked {b.revoked}, its session still in the group: run `bridge revoke` again"
        print(f"{b.name:<{name_width}}  {b.username:<{login_width}}  {b.added:<25}  {status}")
    return 0


def _site(site: Site, *, renew: bool, new_bridge_password: bool) -> int:
    setup = site.setup(renew=renew, new_bridge_password=new_bridge_password)
    _made(setup)
    if setup.made:
        _reload(site)
    paths = site.paths
    print(
        f"the site broker's files are in {_shown(paths.broker)}: "
        "ca.crt, server.crt, server.key, passwd, acl\n"
        "  (configs/mosquitto-site.conf reads them from /etc/mosquitto/nerve: set site.broker_dir there)\n"
        "the bridge's settings (its --config file; no secret here, the passwords are in the files named):"
    )
    import yaml  # noqa: PLC0415 - as the site module: not at every `nerve` start (~10 ms)

    bridge = {"mqtt": site.bridge_settings(setup.hosts), "bridge": site.downlink_settings()}
    print(yaml.safe_dump(bridge, sort_keys=False), end="")
    return 0
