"""The actions beyond clear_temp, through the executor: programs by argv, /proc diagnostics, plugins.

journalctl and systemctl are fake scripts in tmp_path (their paths are settings) that record the argv
they were given, so a test can tell exactly what ran, and that nothing ran on a refusal.
"""

from __future__ import annotations

import os
import textwrap
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from nerve.edge.actions import ActionArgumentError
from nerve.edge.allowlist import ActionPluginError, build_allow_list, load_plugin
from nerve.edge.diagnostics import CollectDiagnostics
from nerve.edge.executor import INTERRUPTED_REASON, RERUN_REASON, Executor, command_digest
from nerve.edge.processes import run_program
from nerve.runtime.config.settings import Settings
from nerve.runtime.envelope.codec import decode, to_msgpack
from nerve.runtime.envelope.model import Command, CommandResult
from nerve.runtime.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from nerve.edge.journal import CommandJournal
    from nerve.runtime.trust.signing import Signer

DEVICE = "pi-01"
PREFIX = "nerve"


def as_model(result: CommandResult) -> CommandResult:
    """The executor's answer, decoded from its bytes (which proves them valid)."""
    model = decode(to_msgpack(result), CommandResult)
    assert model == result  # nothing lost on the way
    return model


def fake(path: Path, *, exit_code: int = 0, stderr: str = "", extra: str = "") -> Path:
    """A program that appends its argv (one line, args separated by '|') to `<path>.argv`."""
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s|" "$@" >> "{path}.argv"\n'
        f'echo >> "{path}.argv"\n'
        f"{extra}\n"
        f'printf "%s" "{stderr}" >&2\n'
        f"exit {exit_code}\n"
    )
    path.chmod(0o755)
    return path


def calls(program: Path) -> list[list[str]]:
    record = program.with_name(program.name + ".argv")
    if not record.exists():
        return []
    return [line.rstrip("|").split("|") for line in record.read_text().splitlines()]


def make_executor(
    tmp_path: Path, keys: Path, journal: CommandJournal, actions: dict[str, Any], **edge: Any
) -> Executor:
    settings = Settings.model_validate(
        {"edge": {"trusted_keys_dir": str(keys), "mounts": [str(tmp_path)], "actions": actions, **edge}}
    )
    return Executor.from_settings(settings, device=DEVICE, journal=journal)


def send(
    executor: Executor,
    signer: Signer,
    action: str,
    args: dict[str, Any],
    *,
    ttl: timedelta = timedelta(minutes=1),
    command_id: str | None = None,
) -> tuple[Command, CommandResult]:
    command = signer.sign(
        Command.create(
            device=DEVICE, action=action, args=args, source="nerve://test", ttl=ttl, command_id=command_id
        )
    )
    result = executor.handle(f"{PREFIX}/{DEVICE}/commands/{action}", to_msgpack(command), prefix=PREFIX)
    assert result is not None
    return command, as_model(result)


@pytest.fixture
def journalctl(tmp_path: Path) -> Path:
    return fake(tmp_path / "journalctl", stderr="Vacuuming done, freed 1.0M")


@pytest.fixture
def systemctl(tmp_path: Path) -> Path:
    return fake(tmp_path / "systemctl")


@pytest.fixture
def executor(
    tmp_path: Path, keys: Path, journal: CommandJournal, journalctl: Path, systemctl: Path
) -> Executor:
    marker = tmp_path / "ran.txt"
    return make_executor(
        tmp_path,
        keys,
        journal,
        {
            "allow": ["vacuum_journal", "restart_service", "run", "collect_diagnostics"],
            "journalctl": [str(journalctl)],
            "systemctl": [str(systemctl)],
            "services": ["nginx.service", "sensor@1.service"],
            "scripts": {
                "mark": {"argv": ["/bin/sh", "-c", f'echo ran >> "{marker}"; echo marked']},
                "literal": {"argv": ["/bin/echo", "$(touch " + str(tmp_path / "pwned") + ")", ";", "|"]},
                "noisy": {"argv": ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]},
                "sleepy": {"argv": ["/bin/sleep", "30"], "timeout_s": 0.3},
                "fails": {"argv": ["/bin/sh", "-c", "echo oops >&2; exit 3"]},
                "missing": {"argv": [str(tmp_path / "no-such-program")]},
            },
            "max_output_bytes": 1000,
        },
    )


# --- vacuum_journal ---------------------------------------------------------------------------------


def test_vacuum_journal_runs_journalctl_with_the_size(
    executor: Executor, signer: Signer, journalctl: Path
) -> None:
    _, result = send(executor, signer, "vacuum_journal", {"size_mb": 100})
    assert result.status == "ok", result.reason
    assert calls(journalctl) == [["--vacuum-size=100M"]]
    assert result.data["exit_code"] == 0
    assert result.data["stderr"] == "Vacuuming done, freed 1.0M"
    assert result.data["summary"] == "journal vacuumed to at most 100 MiB"


def test_vacuum_journal_default_size(executor: Executor, signer: Signer, journalctl: Path) -> None:
    assert send(executor, signer, "vacuum_journal", {})[1].status == "ok"
    assert calls(journalctl) == [["--vacuum-size=256M"]]


def test_vacuum_journal_through_a_root_oneshot_unit(  # noqa: PLR0917 - fixtures
    tmp_path: Path, keys: Path, journal: CommandJournal, signer: Signer, systemctl: Path, journalctl: Path
) -> None:
    executor = make_executor(
        tmp_path,
        keys,
        journal,
        {"allow": ["vacuum_journal"], "systemctl": [str(systemctl)], "vacuum_unit": "nerve-journal-vacuum"},
    )
    _, result = send(executor, signer, "vacuum_journal", {"size_mb": 128})
    assert result.status == "ok", result.reason
    assert calls(systemctl) == [["--no-ask-password", "start", "nerve-journal-vacuum@128M.service"]]
    assert calls(journalctl) == []


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"size_mb": 1}, "argument 'size_mb' is 1; expected a whole number of MiB from 64 to 65536"),
        ({"size_mb": 10**9}, "is 1000000000"),
        ({"size_mb": "100M"}, "argument 'size_mb' is a str"),
        ({"size_mb": 100.5}, "is a float"),
        ({"size_mb": True}, "is a bool"),
        ({"size_mb": 100, "path": "/var/log"}, "argument 'path' is not a known argument"),
    ],
)
def test_vacuum_journal_bad_size_runs_nothing(
    executor: Executor, signer: Signer, journalctl: Path, args: dict[str, Any], reason: str
) -> None:
    _, result = send(executor, signer, "vacuum_journal", args)
    assert result.status == "rejected"
    assert reason in result.reason
    assert calls(journalctl) == []


# --- restart_service --------------------------------------------------------------------------------


def test_restart_service_restarts_an_allow_listed_unit(
    executor: Executor, signer: Signer, systemctl: Path
) -> None:
    _, result = send(executor, signer, "restart_service", {"unit": "sensor@1.service"})
    assert result.status == "ok", result.reason
    assert calls(systemctl) == [["--no-ask-password", "restart", "sensor@1.service"]]
    assert result.data["summary"] == "restarted sensor@1.service"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"unit": "sshd.service"}, "is 'sshd.service', not on this device's list"),
        ({"unit": "--force nginx.service"}, "not on this device's list"),
        ({"unit": ["nginx.service"]}, "argument 'unit' is a list"),
        ({}, "argument 'unit' is missing"),
        ({"unit": "nginx.service", "verb": "stop"}, "argument 'verb' is not a known argument"),
    ],
)
def test_restart_service_refuses_other_units(
    executor: Executor, signer: Signer, systemctl: Path, args: dict[str, Any], reason: str
) -> None:
    _, result = send(executor, signer, "restart_service", args)
    assert result.status == "rejected"
    assert reason in result.reason
    expected = "expected 'unit'" if "verb" in args else "['nginx.service', 'sensor@1.service']"
    assert expected in result.reason
    assert calls(systemctl) == []


def test_restart_service_failing_is_failed_with_output(
    tmp_path: Path, keys: Path, journal: CommandJournal, signer: Signer
) -> None:
    systemctl = fake(tmp_path / "broken-systemctl", exit_code=5, stderr="Unit nginx.service not found.")
    executor = make_executor(
        tmp_path,
        keys,
        journal,
        {"allow": ["restart_service"], "systemctl": [str(systemctl)], "services": ["nginx.service"]},
    )
    _, result = send(executor, signer, "restart_service", {"unit": "nginx.service"})
    assert result.status == "failed"
    assert result.reason.endswith("broken-systemctl exited with 5")
    assert result.data["exit_code"] == 5
    assert result.data["stderr"] == "Unit nginx.service not found."


def test_restart_service_without_services_is_not_allow_listed(
    tmp_path: Path, keys: Path, journal: CommandJournal, signer: Signer
) -> None:
    executor = make_executor(tmp_path, keys, journal, {"allow": ["restart_service"]})
    _, result = send(executor, signer, "restart_service", {"unit": "nginx.service"})
    assert result.status == "rejected"
    assert "not allow-listed on this device (no services are configured" in result.reason


# --- run ----------------------------------------------------------------------------------------------


def test_run_starts_the_named_script(executor: Executor, signer: Signer, tmp_path: Path) -> None:
    _, result = send(executor, signer, "run", {"script": "mark"})
    assert result.status == "ok", result.reason
    assert (tmp_path / "ran.txt").read_text() == "ran\n"
    assert result.data["script"] == "mark"
    assert result.data["stdout"] == "marked\n"
    assert result.data["exit_code"] == 0
    assert result.data["output_truncated"] is False


def test_run_never_uses_a_shell(executor: Executor, signer: Signer, tmp_path: Path) -> None:
    _, result = send(executor, signer, "run", {"script": "literal"})
    assert result.status == "ok"
    assert result.data["stdout"] == f"$(touch {tmp_path / 'pwned'}) ; |\n"
    assert not (tmp_path / "pwned").exists()


def test_run_caps_the_output(executor: Executor, signer: Signer) -> None:
    _, result = send(executor, signer, "run", {"script": "noisy"})
    assert result.status == "ok"
    assert result.data["stdout"] == "x" * 1000
    assert result.data["output_truncated"] is True


def test_run_kills_a_script_past_its_timeout(executor: Executor, signer: Signer) -> None:
    _, result = send(executor, signer, "run", {"script": "sleepy"})
    assert result.status == "failed"
    assert result.reason == "script sleepy: /bin/sleep timed out after 0.3 s and was killed"
    assert result.data["timed_out"] is True
    assert result.data["exit_code"] is None


def test_run_reports_a_non_zero_exit(executor: Executor, signer: Signer) -> None:
    _, result = send(executor, signer, "run", {"script": "fails"})
    assert result.status == "failed"
    assert result.reason == "script fails: /bin/sh exited with 3"
    assert (result.data["exit_code"], result.data["stderr"]) == (3, "oops\n")


def test_run_reports_a_program_that_cannot_start(executor: Executor, signer: Signer) -> None:
    _, result = send(executor, signer, "run", {"script": "missing"})
    assert result.status == "failed"
    assert "could not start" in result.reason
    assert "No such file or directory" in result.reason


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"script": "mark; rm -rf /"}, "not on this device's list"),
        ({"script": "/bin/sh"}, "not on this device's list"),
        ({"script": "mark", "argv": ["/bin/sh"]}, "argument 'argv' is not a known argument"),
        ({"script": 7}, "argument 'script' is a int"),
    ],
)
def test_run_refuses_anything_but_a_script_name(
    executor: Executor, signer: Signer, tmp_path: Path, args: dict[str, Any], reason: str
) -> None:
    _, result = send(executor, signer, "run", args)
    assert result.status == "rejected"
    assert reason in result.reason
    assert not (tmp_path / "ran.txt").exists()


def test_run_program_output_of_both_streams_is_kept_apart() -> None:
    outcome = run_program(["/bin/sh", "-c", "echo out; echo err >&2"], timeout_s=10, max_output_bytes=100)
    assert (outcome.stdout, outcome.stderr, outcome.exit_code) == ("out\n", "err\n", 0)
    assert outcome.succeeded


def test_run_program_sees_a_fixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NERVE_SECRET", "leak")
    outcome = run_program(["/usr/bin/env"], timeout_s=10, max_output_bytes=10_000)
    assert "NERVE_SECRET" not in outcome.stdout
    assert "PATH=/usr/local/sbin" in outcome.stdout


# --- collect_diagnostics -----------------------------------------------------------------------------


def test_collect_diagnostics(executor: Executor, signer: Signer, tmp_path: Path) -> None:
    _, result = send(executor, signer, "collect_diagnostics", {"top": 3})
    assert result.status == "ok", result.reason
    data = result.data
    assert [disk["mount"] for disk in data["disks"]] == [str(tmp_path)]
    assert data["disks"][0]["total_bytes"] > 0
    assert data["memory"]["MemTotal_bytes"] >= data["memory"]["MemAvailable_bytes"] > 0
    assert len(data["load"]) == 3
    assert len(data["top_rss"]) == 3
    assert len(data["top_cpu"]) == 3
    rss = [row["rss_bytes"] for row in data["top_rss"]]
    assert rss == sorted(rss, reverse=True)
    assert data["processes"] >= 3
    assert data["summary"].startswith(f"{data['processes']} processes")


def test_collect_diagnostics_finds_this_process(tmp_path: Path) -> None:
    action = CollectDiagnostics([str(tmp_path)], sample_s=0.01)
    data = action.run(action.validate({"top": 50}))
    mine = os.getpid()
    assert any(row["pid"] == mine for row in data["top_rss"]) or data["processes"] > 50


def test_collect_diagnostics_reads_a_fake_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, name, rss in ((1, "init", 100), (42, "my (weird) name", 5000)):
        (proc / str(pid)).mkdir(parents=True)
        fields = ["S"] + ["0"] * 10 + ["7", "3"] + ["0"] * 8 + [str(rss)]
        (proc / str(pid) / "stat").write_text(f"{pid} ({name}) {' '.join(fields)}\n")
    (proc / "self").mkdir()
    (proc / "meminfo").write_text("MemTotal:  2048 kB\nMemAvailable: 1024 kB\nHugePages_Total: 0\n")
    action = CollectDiagnostics([str(tmp_path / "nowhere")], proc=proc, sample_s=0.0)
    data = action.run(action.validate({"top": 1}))
    assert data["processes"] == 2
    assert [row["name"] for row in data["top_rss"]] == ["my (weird) name"]
    assert data["top_rss"][0]["rss_bytes"] == 5000 * os.sysconf("SC_PAGE_SIZE")
    assert data["memory"] == {"MemTotal_bytes": 2048 * 1024, "MemAvailable_bytes": 1024 * 1024}
    assert data["disks"] == [{"mount": str(tmp_path / "nowhere"), "error": "No such file or directory"}]


@pytest.mark.parametrize(("top", "got"), [(0, "is 0"), (51, "is 51"), ("5", "is a str"), (True, "is a bool")])
def test_collect_diagnostics_bad_top(tmp_path: Path, top: object, got: str) -> None:
    with pytest.raises(ActionArgumentError, match=got):
        CollectDiagnostics([str(tmp_path)]).validate({"top": top})


# --- interrupted by a restart: only idempotent actions run again -----------------------------------


def interrupted(
    executor: Executor, signer: Signer, journal: CommandJournal, action: str, args: dict[str, Any]
) -> Command:
    command = signer.sign(
        Command.create(device=DEVICE, action=action, args=args, source="t", ttl=timedelta(minutes=1))
    )
    journal.start(command.id, expires=command.expires, digest=command_digest(command))
    return command


def test_an_interrupted_idempotent_action_runs_again(
    executor: Executor, signer: Signer, journal: CommandJournal, journalctl: Path
) -> None:
    command = interrupted(executor, signer, journal, "vacuum_journal", {"size_mb": 100})
    payload = to_msgpack(command)
    result = executor.handle(f"{PREFIX}/{DEVICE}/commands/vacuum_journal", payload, prefix=PREFIX)
    assert result is not None
    assert (result.status, result.reason) == ("ok", RERUN_REASON)
    assert calls(journalctl) == [["--vacuum-size=100M"]]
    # Now finished: a further delivery gets that result and runs nothing.
    again = executor.handle(f"{PREFIX}/{DEVICE}/commands/vacuum_journal", payload, prefix=PREFIX)
    assert again == result
    assert calls(journalctl) == [["--vacuum-size=100M"]]


def test_an_interrupted_non_idempotent_action_is_unknown(
    executor: Executor, signer: Signer, journal: CommandJournal, systemctl: Path
) -> None:
    command = interrupted(executor, signer, journal, "restart_service", {"unit": "nginx.service"})
    result = executor.handle(
        f"{PREFIX}/{DEVICE}/commands/restart_service", to_msgpack(command), prefix=PREFIX
    )
    assert result is not None
    assert (result.status, result.reason) == ("unknown", INTERRUPTED_REASON)
    assert calls(systemctl) == []


def test_an_interrupted_idempotent_action_past_its_expiry_is_unknown(
    executor: Executor, signer: Signer, journal: CommandJournal, journalctl: Path
) -> None:
    command = signer.sign(
        Command.create(
            device=DEVICE, action="vacuum_journal", args={}, source="t", ttl=timedelta(seconds=-60)
        )
    )
    journal.start(command.id, expires=command.expires, digest=command_digest(command))
    result = executor.handle(f"{PREFIX}/{DEVICE}/commands/vacuum_journal", to_msgpack(command), prefix=PREFIX)
    assert result is not None
    assert result.status == "unknown"
    assert "expired since" in result.reason
    assert calls(journalctl) == []


# --- replayed and oversized -------------------------------------------------------------------------


def test_a_journalled_id_reused_by_another_command_is_refused_as_replayed(
    executor: Executor, signer: Signer, systemctl: Path
) -> None:
    first, result = send(executor, signer, "restart_service", {"unit": "nginx.service"})
    assert result.status == "ok"
    other, refused = send(
        executor, signer, "restart_service", {"unit": "sensor@1.service"}, command_id=first.id
    )
    assert refused.status == "rejected"
    assert refused.reason.startswith(f"replayed: command id {first.id!r} was used before")
    assert calls(systemctl) == [["--no-ask-password", "restart", "nginx.service"]]
    # The journal still answers the first command with its own result.
    again = executor.handle(f"{PREFIX}/{DEVICE}/commands/restart_service", to_msgpack(first), prefix=PREFIX)
    assert again is not None
    assert as_model(again) == result
    assert other.id == first.id


def test_the_same_request_re_created_under_its_id_gets_the_recorded_result(
    executor: Executor, signer: Signer, systemctl: Path
) -> None:
    # A central that restarts re-creates a command under its derived id, with a new time and expiry.
    first, result = send(executor, signer, "restart_service", {"unit": "nginx.service"})
    again, answer = send(executor, signer, "restart_service", {"unit": "nginx.service"}, command_id=first.id)
    assert again.time != first.time or again.sig != first.sig
    assert answer == result
    assert calls(systemctl) == [["--no-ask-password", "restart", "nginx.service"]]


def test_oversized_arguments_are_refused(executor: Executor, signer: Signer, tmp_path: Path) -> None:
    _, result = send(executor, signer, "run", {"script": "mark", "pad": "x" * 5000})
    assert result.status == "rejected"
    assert "arguments too large" in result.reason
    assert "the limit is 4096 bytes" in result.reason
    assert not (tmp_path / "ran.txt").exists()


# --- the allow-list and plugins ----------------------------------------------------------------------


def test_only_allowed_actions_run(
    tmp_path: Path, keys: Path, journal: CommandJournal, signer: Signer
) -> None:
    journalctl = fake(tmp_path / "jctl")
    executor = make_executor(
        tmp_path, keys, journal, {"allow": ["collect_diagnostics"], "journalctl": [str(journalctl)]}
    )
    assert executor.actions == frozenset({"collect_diagnostics"})
    _, result = send(executor, signer, "vacuum_journal", {})
    assert (result.status, result.reason) == (
        "rejected",
        "action 'vacuum_journal' is not allow-listed on this device",
    )
    assert calls(journalctl) == []
    _, result = send(executor, signer, "clear_temp", {})
    assert "not allow-listed on this device (not in edge.actions.allow)" in result.reason


PLUGIN = textwrap.dedent(
    """
    from pathlib import Path

    from nerve.edge import ActionArgumentError, ActionFailed


    class Touch:
        name = "touch"
        idempotent = True

        def __init__(self, options):
            self.directory = Path(options["directory"])

        def validate(self, args):
            if set(args) != {"name"} or args["name"] not in ("a", "b", "fail"):
                raise ActionArgumentError("touch", "name", "'a' or 'b'", "is wrong")
            return {"name": args["name"]}

        def run(self, args):
            if args["name"] == "fail":
                raise ActionFailed("could not", {"why": "asked to"})
            (self.directory / args["name"]).touch()
            return {"touched": args["name"]}


    class Buggy:
        name = "buggy"
        idempotent = False

        def validate(self, args):
            raise ValueError("bug in validate")

        def run(self, args):
            return {}


    def buggy(options):
        return Buggy()


    def misnamed(options):
        return Buggy()


    def not_an_action(options):
        return object()
    """
)


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module and a dist-info declaring entry points in group nerve.actions, on sys.path."""
    site = tmp_path / "site"
    (site / "nerve_test_plugins-1.0.dist-info").mkdir(parents=True)
    (site / "nerve_test_plugins.py").write_text(PLUGIN)
    (site / "nerve_test_plugins-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: nerve-test-plugins\nVersion: 1.0\n"
    )
    (site / "nerve_test_plugins-1.0.dist-info" / "entry_points.txt").write_text(
        "[nerve.actions]\n"
        "touch = nerve_test_plugins:Touch\n"
        "buggy = nerve_test_plugins:buggy\n"
        "misnamed = nerve_test_plugins:misnamed\n"
        "not_an_action = nerve_test_plugins:not_an_action\n"
        "broken = nerve_test_plugins_gone:factory\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_plugin_runs_when_allowed(
    plugins: Path, tmp_path: Path, keys: Path, journal: CommandJournal, signer: Signer
) -> None:
    target = tmp_path / "touched"
    target.mkdir()
    executor = make_executor(
        tmp_path,
        keys,
        journal,
        {"allow": ["touch"], "plugins": {"touch": {"directory": str(target)}}},
    )
    _, result = send(executor, signer, "touch", {"name": "a"})
    assert (result.status, result.data) == ("ok", {"touched": "a"})
    assert (target / "a").exists()
    _, result = send(executor, signer, "touch", {"name": "../etc"})
    assert result.status == "rejected"
    assert "touch: argument 'name' is wrong" in result.reason
    _, result = send(executor, signer, "touch", {"name": "fail"})
    assert (result.status, result.reason, result.data) == ("failed", "could not", {"why": "asked to"})


def test_a_plugin_whose_validate_raises_is_refused(
    plugins: Path, tmp_path: Path, keys: Path, journal: CommandJournal, signer: Signer
) -> None:
    executor = make_executor(tmp_path, keys, journal, {"allow": ["buggy"]})
    _, result = send(executor, signer, "buggy", {})
    assert result.status == "rejected"
    assert result.reason == "buggy could not check its arguments: ValueError: bug in validate"


def test_a_configured_plugin_that_is_not_allowed_is_never_loaded(
    plugins: Path, tmp_path: Path, keys: Path, journal: CommandJournal, signer: Signer
) -> None:
    executor = make_executor(tmp_path, keys, journal, {"allow": [], "plugins": {"broken": {}}})
    _, result = send(executor, signer, "broken", {})
    assert result.reason == (
        "action 'broken' is not allow-listed on this device "
        "(configured as a plugin but not in edge.actions.allow)"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "broken",
            (
                "action plugin 'broken': nerve_test_plugins_gone:factory failed to load: "
                "ModuleNotFoundError: No module named 'nerve_test_plugins_gone'"
            ),
        ),
        (
            "not_an_action",
            (
                "action plugin 'not_an_action': nerve_test_plugins:not_an_action returned object, "
                "which lacks name/idempotent/validate/run"
            ),
        ),
        (
            "misnamed",
            (
                "action plugin 'misnamed': nerve_test_plugins:misnamed builds an action named "
                "'buggy', not 'misnamed'"
            ),
        ),
        (
            "absent",
            (
                "action plugin 'absent': not a built-in action and no installed package provides "
                "entry point nerve.actions"
            ),
        ),
    ],
)
def test_a_bad_plugin_is_one_clear_error(plugins: Path, name: str, message: str) -> None:
    with pytest.raises(ActionPluginError) as caught:
        load_plugin(name, {})
    assert str(caught.value) == f"edge.actions.allow: {message}"
    assert "\n" not in str(caught.value)
    assert caught.value.name == name
    assert isinstance(caught.value, ConfigError)


def test_build_allow_list_names_every_disabled_builtin(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"edge": {"actions": {"allow": ["clear_temp", "restart_service", "run", "vacuum_journal"]}}}
    )
    allowed = build_allow_list(settings.edge)
    assert set(allowed.actions) == {"vacuum_journal"}
    assert set(allowed.disabled) == {"clear_temp", "restart_service", "run"}


@pytest.mark.parametrize(
    ("actions", "problem"),
    [
        ({"scripts": {"x": {"argv": ["relative/script"]}}}, "must be an absolute path"),
        ({"scripts": {"x": {"argv": []}}}, "non-empty list"),
        ({"scripts": {"bad name": {"argv": ["/bin/true"]}}}, "script name"),
        ({"services": ["-H evil"]}, "is not a systemd unit name"),
        ({"services": ["../x.service"]}, "is not a systemd unit name"),
        ({"allow": ["run", "run"]}, "allow lists an action twice"),
        ({"plugins": {"run": {}}}, "'run' is a built-in action, not a plugin"),
        ({"vacuum_min_mb": 500, "vacuum_default_mb": 100}, "vacuum_min_mb <= vacuum_default_mb"),
        ({"max_output_bytes": 10**6}, "less than or equal to 32768"),
        ({"journalctl": []}, "non-empty list"),
        ({"alow": ["run"]}, "unknown key"),
    ],
)
def test_bad_action_settings_name_the_key(actions: dict[str, Any], problem: str) -> None:
    from nerve.runtime.config.settings import load_settings  # noqa: PLC0415

    with pytest.raises(ConfigError) as caught:
        load_settings(overrides={"edge": {"actions": actions}})
    assert problem in str(caught.value)
    assert "edge.actions" in str(caught.value)


def test_a_command_at_the_hops_limit_is_still_answered(executor: Executor, signer: Signer) -> None:
    # Found by the mutation property test: the answer's hops (one more) must not break the envelope.
    command = msgspec.structs.replace(
        signer.sign(
            Command.create(device=DEVICE, action="reboot", args={}, source="t", ttl=timedelta(minutes=1))
        ),
        hops=1_000_000,
    )
    result = executor.handle(f"{PREFIX}/{DEVICE}/commands/reboot", to_msgpack(command), prefix=PREFIX)
    assert result is not None
    assert (result.status, result.hops) == ("rejected", 1_000_000)
