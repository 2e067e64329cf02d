"""`nerve runs` and `nerve approve` end to end: the real commands as the cli identity, an engine running."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.errors import Error as NatsError

from nerve.runtime.cli.runs import OPERATOR_KEYID, operator_signer
from nerve.runtime.config.settings import Settings, load_settings
from nerve.runtime.engine import NO_RETRY, Engine, EngineSettings, Step, Trigger, durable_agent, wait_for_run
from nerve.runtime.engine.journal import DECODER
from nerve.runtime.engine.names import approval_key, cancel_key, run_key
from nerve.runtime.engine.runs import NoSuchRun, check_run_id
from nerve.runtime.envelope.model import Event
from nerve.runtime.jetstream.client import connect, publish_envelope
from nerve.runtime.jetstream.identities import Identity
from nerve.runtime.stack.brokers import NatsServer, free_port
from nerve.runtime.stack.natsauth import LocalNats
from nerve.runtime.subjects import Kind, is_token
from nerve.runtime.trust.signing import Signer, generate_keypair

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.client import Client as NatsClient
    from nats.js.kv import KeyValue

    from nerve.runtime.engine.journal import RunRecord
    from nerve.runtime.envelope.model import Envelope

NERVE = str(Path(sys.executable).parent / "nerve")
FAST = EngineSettings(lease_s=1.0)


@durable_agent(
    "refund",
    trigger=Trigger(Kind.EVENTS, "refund_requested"),
    key=lambda e: str(e.data["order"]),
    retry=NO_RETRY,
)
async def refund(event: Envelope, step: Step) -> str:
    async def hold() -> str:
        return f"held {event.data['order']}"

    async def release() -> None:
        return None

    await step.run("hold", hold, undo=release)
    decision = await step.approve("ok", route="finance", expires=120, summary="a refund")
    return decision.outcome


class Site:
    """nats-server with nerve's identities, and the data dir where the cli finds its own."""

    def __init__(self, data_dir: Path, url: str, local: LocalNats, base: Settings) -> None:
        self.data_dir = data_dir
        self.url = url
        self.local = local
        self.base = base

    async def client(self, identity: Identity) -> NatsClient:
        return await connect(self.local.part(self.base, identity).nats, name=f"test-{identity.value}")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    data_dir = tmp_path / "data"
    port = free_port()
    server_dir = data_dir / "nats-server"
    local = LocalNats.prepare(data_dir, prefix="nerve", port=port, store_dir=server_dir / "jetstream")
    url = f"nats://127.0.0.1:{port}"
    base = load_settings(overrides={"nats": {"url": url}, "data_dir": str(data_dir)})
    async with NatsServer(port=port, data_dir=server_dir, config_file=local.config_file):
        await local.apply_streams(base)
        yield Site(data_dir, url, local, base)


def env(home: Path) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("NERVE_")}
    return clean | {"XDG_CONFIG_HOME": str(home)}


async def nerve(site: Site, home: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        NERVE,
        *args,
        "--nats-url",
        site.url,
        "--data-dir",
        str(site.data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env(home),
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def trigger(nc: NatsClient, order: str) -> str:
    event = Event(
        id=f"e-{order}", source="nerve://shop", type="refund_requested", subject="shop", data={"order": order}
    )
    await publish_envelope(nc.jetstream(), "nerve.shop.events.refund_requested", event)
    return refund.run_id(event.id)


async def pending(kv: KeyValue, run_id: str) -> RunRecord:
    watcher = await kv.watch(run_key(run_id))
    try:
        async with asyncio.timeout(20):
            async for entry in watcher:
                if entry is not None and entry.value:
                    record = DECODER.decode(entry.value)
                    step = record.steps.get("ok")
                    if step is not None and step.result is not None:
                        return record
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    raise AssertionError("the watcher stopped")


async def shows_a_pending_approval(site: Site, home: Path, run_id: str) -> None:
    """`nerve runs show` of a run of `refund` (order o-1) waiting for its approval, as text and JSON."""
    code, out, err = await nerve(site, home, "runs", "show", run_id)
    assert code == 0, err
    assert f"run {run_id}  agent refund  key o-1  waiting" in out
    assert "  hold  done" in out
    assert "undo registered" in out
    assert 'result: "held o-1"' in out
    assert "  ok  waiting" in out
    assert "fact approval_requested: refund: a refund: waiting for finance" in out

    code, out, err = await nerve(site, home, "runs", "show", run_id, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert (document["run_id"], document["trigger"]["id"]) == (run_id, "e-o-1")
    assert [fact["kind"] for fact in document["facts"]] == ["approval_requested"]
    assert document["steps"]["ok"]["result"]["approval"]["route"] == "finance"


async def refused_in_one_line(site: Site, home: Path, ended: str) -> None:
    """Bad ids, bad actions, and runs that have ended: one line each, exit 2, nothing on stdout."""
    for args, message in [
        (("runs", "show", "nope"), "nerve runs: error: no run nope\n"),
        (("runs", "show", "a.>"), "nerve runs: error: 'a.>' is not a run id (1-64 of A-Z a-z 0-9 _ -)\n"),
        (
            ("runs", ended),
            (
                f"nerve runs: error: ACTION: {ended!r}: say `show RUN_ID` or `cancel RUN_ID` "
                "(or nothing: the list)\n"
            ),
        ),
        (
            ("runs", "cancel", ended),
            f"nerve runs: error: run {ended} has ended (done): nothing to cancel\n",
        ),
        (
            ("approve", ended),
            f"nerve approve: error: run {ended} has ended (done): nothing to approve\n",
        ),
        (("approve", "nope"), "nerve approve: error: no run nope\n"),
    ]:
        code, out, err = await nerve(site, home, *args)
        assert (code, out, err) == (2, "", message), args


@pytest.mark.broker
async def test_list_show_approve_and_cancel_runs_as_the_cli_identity(site: Site, tmp_path: Path) -> None:
    keys = tmp_path / "nerve" / "keys"
    private, _ = generate_keypair(keys, "central")
    admin = await site.client(
        Identity.ADMIN
    )  # the engine creates its storage: admin, until central's is wired
    try:
        engine = Engine(nc=admin, agents=[refund], settings=FAST, signer=Signer.from_file(private))
        async with engine:
            approve_id = await trigger(admin, "o-1")
            cancel_id = await trigger(admin, "o-2")
            await pending(engine.kv, approve_id)
            await pending(engine.kv, cancel_id)

            code, out, err = await nerve(site, tmp_path, "runs")
            assert code == 0, err
            lines = out.splitlines()
            assert len(lines) == 2
            assert all(
                "refund" in line and "waiting" in line and "ok: waiting until" in line for line in lines
            )
            assert {approve_id, cancel_id} == {line.split()[1] for line in lines}

            code, out, _ = await nerve(site, tmp_path, "runs", "--state", "done")
            assert (code, out) == (0, "no runs done\n")
            code, out, _ = await nerve(site, tmp_path, "runs", "--state", "waiting", "--json")
            documents = [json.loads(line) for line in out.splitlines()]
            assert sorted(document["key"] for document in documents) == ["o-1", "o-2"]

            await shows_a_pending_approval(site, tmp_path, approve_id)
            code, out, err = await nerve(site, tmp_path, "approve", approve_id, "--comment", "ok by me")
            assert code == 0, err
            assert out.splitlines()[-1] == "the run took it: approved"
            code, out, err = await nerve(site, tmp_path, "runs", "cancel", cancel_id)
            assert code == 0, err
            assert out.startswith(f"cancel requested: run {cancel_id} (refund, key o-2)")
            cancelled = await wait_for_run(engine.kv, cancel_id, timeout=20)
            approved = await wait_for_run(engine.kv, approve_id, timeout=20)
    finally:
        await admin.close()
    assert (approved.state, approved.result) == ("done", "approved")
    assert approved.steps["ok"].result["decision"]["comment"] == "ok by me"
    assert (cancelled.state, cancelled.cancelled) == ("compensated", True)

    code, out, _ = await nerve(site, tmp_path, "runs", "show", cancel_id)
    assert "compensated" in out.splitlines()[0]
    assert "undo done" in out
    await refused_in_one_line(site, tmp_path, approve_id)


@pytest.mark.broker
async def test_a_decision_signed_with_a_key_the_engine_does_not_trust_is_not_taken(
    site: Site, tmp_path: Path
) -> None:
    central, _ = generate_keypair(tmp_path / "central-keys", "central")
    generate_keypair(tmp_path / "nerve" / "keys", OPERATOR_KEYID)  # the operator's own key: not trusted here
    admin = await site.client(Identity.ADMIN)
    try:
        async with Engine(
            nc=admin, agents=[refund], settings=FAST, signer=Signer.from_file(central)
        ) as engine:
            run_id = await trigger(admin, "o-3")
            await pending(engine.kv, run_id)
            code, out, err = await nerve(site, tmp_path, "approve", run_id, "--timeout", "2s")
            record = await engine.record(run_id)
    finally:
        await admin.close()
    assert code == 6, err
    assert "signed with key id operator" in out
    assert "has not taken it within 2s" in out
    assert record is not None
    assert record.steps["ok"].status == "waiting"


@pytest.mark.broker
async def test_the_cli_identity_may_write_only_cancel_requests_and_decisions(site: Site) -> None:
    cli = await site.client(Identity.CLI)
    admin = await site.client(Identity.ADMIN)
    try:
        async with Engine(nc=admin, agents=[]):  # it creates its storage
            kv = await cli.jetstream(timeout=1.0).key_value("nerve_runs")
            await kv.put(cancel_key("r1"), b"cancel")
            await kv.put(approval_key("r1", "d1"), b"{}")
            for key in (run_key("r1"), "cancel.r1.more", "other"):
                with pytest.raises((NatsError, TimeoutError)):
                    await kv.put(key, b"{}")
            assert (await kv.get(cancel_key("r1"))).value == b"cancel"
            assert await (await admin.jetstream().key_value("nerve_runs")).keys() == [
                cancel_key("r1"),
                approval_key("r1", "d1"),
            ]
    finally:
        await cli.close()
        await admin.close()


def test_the_operator_key_is_preferred_when_there_is_one(tmp_path: Path) -> None:
    settings = Settings.model_validate({})
    generate_keypair(tmp_path, "central")
    assert operator_signer(settings, None, tmp_path).keyid == "central"
    generate_keypair(tmp_path, OPERATOR_KEYID)
    assert operator_signer(settings, None, tmp_path).keyid == OPERATOR_KEYID
    explicit = tmp_path / "central.key"
    assert operator_signer(settings, explicit, tmp_path).keyid == "central"  # --key wins


@given(st.text(max_size=80))
def test_a_run_id_is_a_token_or_one_line_naming_it(text: str) -> None:
    if is_token(text):
        assert check_run_id(text) == text
        return
    with pytest.raises(NoSuchRun) as refused:
        check_run_id(text)
    assert str(refused.value) == f"{text!r} is not a run id (1-64 of A-Z a-z 0-9 _ -)"
