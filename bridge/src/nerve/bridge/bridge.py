"""The bridge: MQTT ⇄ JetStream, the uplink on one persistent MQTT session, the downlink on another.

One process runs both, or one of them (`bridge.part`): an `uplink` process and a `downlink` process with
the same settings split the work, and a command never waits for the CPU or the interpreter that the
readings take.

Uplink: every message from devices is stored in JetStream (or dead-lettered with the reason) before
its PUBACK goes back to mosquitto, so a bridge killed at any moment loses nothing: mosquitto redelivers
what was not acknowledged, and JetStream's dedup (by event id) stores an envelope once.

Downlink (`nerve.bridge.downlink`): a durable JetStream consumer on NERVE_COMMANDS, sent down on an MQTT
connection of its own with many commands in flight; a command is acknowledged to JetStream only after
mosquitto acknowledged the QoS1 publish. An expired command is not sent: a CommandResult `expired` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError

from nerve.bridge.downlink import Downlink
from nerve.bridge.metrics import MetricsServer
from nerve.bridge.natsclient import connect_nats
from nerve.bridge.natswire import NatsWire, NatsWireError, open_nats
from nerve.bridge.pump import Pump
from nerve.bridge.redelivery import RedeliveredIds, ids_path
from nerve.bridge.spool import Spool, spool_path
from nerve.bridge.stats import BridgeStats
from nerve.bridge.uplink import uplink_filters
from nerve.runtime.backoff import Backoff
from nerve.runtime.cancellation import checkpoint
from nerve.runtime.errors import shown_url
from nerve.runtime.jetstream.identities import load_nkey
from nerve.runtime.jetstream.streams import ready_streams
from nerve.runtime.wire.mqtt import MqttWire, MqttWireError, open_mqtt

if TYPE_CHECKING:
    from nerve.runtime.config.settings import Settings

log = logging.getLogger(__name__)

STORE_TIMEOUT_S: Final = 5.0
WATCH_INTERVAL_S: Final = 1.0
DRAIN_TIMEOUT_S: Final = 5.0
#: How long the uplink waits for the downlink to connect first, at start.
DOWNLINK_FIRST_S: Final = 5.0
SUBSCRIBE_TIMEOUT_S: Final = 30.0
#: The interpreter's switch interval while the downlink thread runs (Python's default is 5 ms): how long
#: the downlink waits at most for the uplink thread to hand over the GIL, at every hop of a command.
DOWNLINK_SWITCH_INTERVAL_S: Final = 0.001

#: What `bridge: running ...` says at start, by `bridge.part`.
_PARTS: Final = {
    "both": "uplink and downlink",
    "uplink": "the uplink only (bridge.part: uplink; commands need a downlink process)",
    "downlink": "the downlink only (bridge.part: downlink; readings need an uplink process)",
}


class Bridge:
    """Runs uplink and downlink (or the one `bridge.part` names) until cancelled; reconnects forever.

    `ready` is set while the uplink is subscribed and the downlink has its connections and consumer (of
    what this process runs). `downlink` is the running downlink (None before `run` reached NATS, and in
    an uplink-only process).
    """

    def __init__(self, *, settings: Settings) -> None:
        self._settings = settings
        self._prefix = settings.prefix
        self._metrics = frozenset(settings.bridge.metrics)
        part = settings.bridge.part
        self._uplink = part in {"both", "uplink"}
        self._downlink = part in {"both", "downlink"}
        self.stats = BridgeStats()
        self.ready = asyncio.Event()
        self.downlink: Downlink | None = None
        self._uplink_ready = asyncio.Event()
        self._downlink_ready = asyncio.Event()
        # Across uplink sessions, and across a kill of this process (a file in the data dir): what
        # mosquitto sends again after a reconnect keeps its first id. Not opened by a downlink-only
        # process, which shares the uplink's client id and so its file's name.
        self._redelivered_ids = RedeliveredIds(ids_path(settings) if self._uplink else None)
        self._spool = open_spool(settings) if self._uplink else None

    def _ready_changed(self) -> None:
        if self.downlink is not None and self.downlink.ready.is_set():
            self._downlink_ready.set()
        else:
            self._downlink_ready.clear()
        uplink_ready = self._uplink_ready.is_set() or not self._uplink
        if uplink_ready and (self._downlink_ready.is_set() or not self._downlink):
            self.ready.set()
        else:
            self.ready.clear()

    def _uplink_is(self, *, ready: bool) -> None:
        if ready:
            self._uplink_ready.set()
        else:
            self._uplink_ready.clear()
        self._ready_changed()

    async def run(self) -> None:
        """Bridge until cancelled. Cancelling loses nothing: unacknowledged messages are redelivered."""
        metrics = None
        if self._settings.bridge.metrics_port is not None:
            metrics = MetricsServer(
                self.stats,
                address=self._settings.bridge.metrics_address,
                port=self._settings.bridge.metrics_port,
            )
            log.info(
                "bridge: metrics on http://%s:%d/metrics", self._settings.bridge.metrics_address, metrics.port
            )
        try:
            await self._bridge()
        finally:
            self._redelivered_ids.close()
            if self._spool is not None:
                self._spool.close()
            if metrics is not None:
                metrics.close()

    async def _bridge(self) -> None:
        nc = await connect_nats(self._settings.nats, name="nerve-bridge")
        try:
            js = nc.jetstream()
            await ready_streams(js, self._prefix, configure=self._settings.nats.nkey_file is None)
            main = asyncio.get_running_loop()

            def ready_changed() -> None:  # called in the downlink's thread
                main.call_soon_threadsafe(self._ready_changed)

            if self._downlink:
                self.downlink = Downlink(settings=self._settings, stats=self.stats, on_ready=ready_changed)
            log.info("bridge: running %s", _PARTS[self._settings.bridge.part])
            async with asyncio.TaskGroup() as tasks:
                # Each on its own MQTT connection, each reconnecting on its own: a stalled uplink (NATS
                # slow, its in-flight window full) holds no command, and a command no reading.
                if self._downlink:
                    tasks.create_task(self._run_downlink(), name="bridge-downlink")
                    # The downlink connects first: a resumed uplink session floods the process with
                    # readings from its first moment, and would slow the downlink's start (bounded: a
                    # downlink that cannot connect, say its login is missing, holds no reading back long).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DOWNLINK_FIRST_S):
                            await self._downlink_ready.wait()
                if self._uplink:
                    tasks.create_task(self._run_mqtt(), name="bridge-uplink")
                await asyncio.Future()  # parked in the body (see `_session`)
        finally:
            self.ready.clear()
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await nc.close()

    async def _run_downlink(self) -> None:
        """The downlink, in a thread of its own with its own event loop and NATS connection.

        Why a thread: under a reading backlog the uplink keeps this loop busy (each socket read brings up
        to `bridge.max_in_flight` readings to translate and store, tens of milliseconds of CPU), and a
        command waiting on the same loop waited a batch per hop. In its own thread a command waits at
        most the interpreter's switch interval for the GIL at each hop (NATS socket, decode, MQTT write,
        PUBACK): `DOWNLINK_SWITCH_INTERVAL_S` (1 ms) while the downlink runs, not Python's 5 ms. It costs
        the uplink nothing while the downlink is idle (the interval only matters when a thread waits for
        the GIL). Measured with `bench/downlink.py --commands 100 --gap-ms 10` (commands sent while the
        bridge drains 60,000 queued readings), two runs each: p50 24.1 / 26.9 ms and p99 135.0 / 150.9 ms
        at 5 ms; p50 5.2 / 6.3 ms and p99 37.4 / 48.9 ms at 1 ms; 0.5 ms was no better (p99 69.0 / 51.1).
        Cancelling this cancels the downlink (what it holds is handed back to JetStream) and waits for
        its thread to end.
        """
        downlink = self.downlink
        assert downlink is not None  # noqa: S101 - set by `_bridge` before this starts
        main = asyncio.get_running_loop()
        ended: asyncio.Future[None] = main.create_future()

        def report(outcome: BaseException | None) -> None:
            if ended.done():
                return
            if outcome is None:
                ended.set_result(None)
            else:
                ended.set_exception(outcome)

        def thread() -> None:
            outcome: BaseException | None = None
            try:
                asyncio.run(downlink.run_in_thread())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the bridge's task, which raises it
                outcome = exc
            main.call_soon_threadsafe(report, outcome)

        worker = threading.Thread(target=thread, name="nerve-bridge-downlink", daemon=True)
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, DOWNLINK_SWITCH_INTERVAL_S))
        worker.start()
        try:
            await asyncio.shield(ended)
        finally:
            # Drained first (what is in flight gets its PUBACK and is acknowledged), then at once.
            for drain in (True, False):
                downlink.stop(drain=drain)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(DRAIN_TIMEOUT_S + 1):
                        await asyncio.shield(ended)
                if ended.done():
                    break
            sys.setswitchinterval(switch_interval)

    async def _run_mqtt(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._session(backoff)
            except* (MqttWireError, NatsWireError) as group:
                failure: BaseException = group.exceptions[0]
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            self.stats.reconnects += 1
            delay = backoff.next_delay()
            log.warning("bridge: %s; reconnecting in %.1fs", failure, delay)
            await asyncio.sleep(delay)

    async def _session(self, backoff: Backoff) -> None:
        """One MQTT session and one NATS publishing connection, until either fails (or cancelled)."""
        settings = self._settings
        pump = Pump(
            loop=asyncio.get_running_loop(),
            stats=self.stats,
            prefix=self._prefix,
            metrics=self._metrics,
            max_payload=settings.bridge.max_payload,
            mappings=settings.bridge.mappings,
            ranges=settings.bridge.effective_ranges,
            store_timeout_s=STORE_TIMEOUT_S,
            max_in_flight=settings.bridge.max_in_flight,
            codec=settings.nats.codec,
            ids=self._redelivered_ids,
            route_cache=settings.bridge.route_cache,
            spool=self._spool,
        )
        # Read at every session: a rotated seed is picked up at the next reconnect.
        nkey = load_nkey(settings.nats.nkey_file) if settings.nats.nkey_file is not None else None
        nats_wire = await open_nats(
            settings.nats.url, name="nerve-bridge-uplink", on_acks=pump.on_acks, nkey=nkey
        )
        pump.attach_nats(nats_wire)
        mqtt_wire: MqttWire | None = None
        try:
            mqtt_wire = await open_mqtt(
                settings.mqtt,
                client_id=settings.bridge.client_id,
                on_messages=pump.on_messages,
                clean_start=False,
                session_expiry_s=settings.mqtt.session_expiry_s,
                receive_maximum=settings.bridge.max_in_flight,
                on_connack=pump.on_connack,
            )
            pump.attach_mqtt(mqtt_wire)
            filters = uplink_filters(
                self._prefix, settings.bridge.mappings, shared_group=settings.bridge.shared_group
            )
            try:
                async with asyncio.TaskGroup() as tasks:
                    # Watched from the start: a resumed session floods in before the SUBACK (the pump may
                    # pause reading at max_in_flight until stores come back), and NATS may go meanwhile.
                    tasks.create_task(self._watch(pump, mqtt_wire, nats_wire), name="bridge-watch")
                    tasks.create_task(self._subscribe(mqtt_wire, filters, backoff), name="bridge-subscribe")
                    # Park in the body: on 3.11 a TaskGroup whose child fails while the parent waits in
                    # __aexit__ leaves the parent's cancel count raised for good.
                    await asyncio.Future()
            finally:
                self._uplink_is(ready=False)
        finally:
            if mqtt_wire is not None:
                await self._drain(pump, mqtt_wire, nats_wire)
                mqtt_wire.close()
            nats_wire.close()
            self.stats.in_flight = 0  # what was not acknowledged is mosquitto's again

    async def _subscribe(self, mqtt_wire: MqttWire, filters: list[str], backoff: Backoff) -> None:
        """Subscribe the uplink; it is ready then.

        Retain Handling 2: the retained messages under the prefix (every device's `status`) are not sent
        at each subscribe, only what is published from now on. (No Local, where allowed, only keeps back
        what this connection publishes, which is nothing: the downlink's commands come on another one,
        and are acknowledged and ignored when they come back up.)
        """
        await mqtt_wire.subscribe(
            filters,
            timeout_s=SUBSCRIBE_TIMEOUT_S,
            retain_handling=2,
            no_local=self._settings.bridge.shared_group is None,
        )
        backoff.reset()
        log.info(
            "bridge: connected to %s and %s",
            shown_url(self._settings.mqtt.url),
            shown_url(self._settings.nats.url),
        )
        self._uplink_is(ready=True)

    async def _drain(self, pump: Pump, mqtt_wire: MqttWire, nats_wire: NatsWire) -> None:
        """Take nothing new, and give what is in flight a moment to be stored and acknowledged."""
        drained = pump.stop_accepting()
        if pump.in_flight and not (mqtt_wire.closed.done() or nats_wire.closed.done()):
            log.info("bridge: draining %d in-flight messages", pump.in_flight)
            with contextlib.suppress(TimeoutError, MqttWireError, NatsWireError):
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await asyncio.wait(
                        [drained, mqtt_wire.closed, nats_wire.closed], return_when=asyncio.FIRST_COMPLETED
                    )

    async def _watch(self, pump: Pump, mqtt_wire: MqttWire, nats_wire: NatsWire) -> None:
        """Raise the reason as soon as either connection ends; meanwhile re-send stores left unanswered."""
        closed = [mqtt_wire.closed, nats_wire.closed]
        while True:
            done, _ = await asyncio.wait(
                closed, timeout=WATCH_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED
            )
            for future in done:
                future.result()  # raises MqttWireError / NatsWireError
            pump.check_timeouts()
            if self._spool is not None:
                await self._sync_spool(self._spool)
            checkpoint()

    async def _sync_spool(self, spool: Spool) -> None:
        """Write what was spooled in the last second to disk (fsync), off the event loop."""
        try:
            await asyncio.to_thread(spool.sync)
        except OSError as exc:
            log.warning("bridge: cannot fsync the spool (%s)", exc.strerror or exc)


def open_spool(settings: Settings) -> Spool | None:
    """The uplink's spool, if `bridge.spool_bytes` is set or an earlier run left one (it is sent first)."""
    path = spool_path(settings)
    budget = settings.bridge.spool_bytes
    if budget == 0 and not path.exists():
        return None
    try:
        return Spool(path, budget=budget)
    except OSError as exc:
        log.warning(
            "bridge: cannot open the spool %s (%s): a backlog waits with mosquitto; set data_dir to a "
            "writable directory",
            path,
            exc.strerror or exc,
        )
        return None
