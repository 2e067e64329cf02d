"""CloudEvents both ways, against the official SDK (`cloudevents` on PyPI): what it makes, nerve stores
unchanged; what nerve stores, it parses.

Two SDK APIs: the classic one (`cloudevents.v1.http`, what 1.x users have) and the new core one
(`cloudevents.core`). Over MQTT through a real bridge into a real JetStream, and as pure codec properties.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as CoreEvent
from cloudevents.v1.conversion import to_json as classic_to_json
from cloudevents.v1.http import CloudEvent as ClassicEvent
from cloudevents.v1.http import from_json as classic_from_json
from hypothesis import given
from hypothesis import strategies as st

from nerve.bridge import Bridge
from nerve.runtime.cli.history import read_facts
from nerve.runtime.envelope.codec import CONTENT_TYPE_HEADER, Codec, content_type, decode, to_json, to_msgpack
from nerve.runtime.envelope.model import Event, Fact
from nerve.runtime.errors import DecodeError
from nerve.runtime.jetstream.client import publish_fact
from nerve.runtime.jetstream.streams import ensure_streams
from nerve.runtime.testing import stream_messages, wait_for_count

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from tests.conftest import Running

    from nerve.runtime.config.settings import Settings

WAIT = 10.0
CORE_JSON = JSONFormat()
ATTRIBUTES = {
    "type": "com.example.door.opened",
    "source": "https://example.com/sites/7",
    "subject": "pi-01",
    "datacontenttype": "application/json",
    "dataschema": "https://example.com/schemas/door.json",
    "region": "eu",
    "floor": 3,
    "ratio": 0.25,
    "critical": True,
}
DATA_KINDS: list[Any] = [{"door": "open", "n": [1, 2]}, [1, "two", 3.5], "opened", 42, 95.5, False]


def classic(attributes: dict[str, Any], data: object) -> bytes:
    """What the classic SDK publishes in structured JSON mode."""
    return classic_to_json(ClassicEvent(dict(attributes), data))


def core(attributes: dict[str, Any], data: object) -> bytes:
    """What the core SDK publishes in structured JSON mode."""
    full = {"id": "core-1", "specversion": "1.0", **attributes}
    return CORE_JSON.write(CoreEvent(attributes=full, data=data))  # type: ignore[arg-type]


def sdk_view(payload: bytes) -> tuple[dict[str, Any], object]:
    """The attributes and data the core SDK reads from a structured JSON event."""
    event = CORE_JSON.read(None, payload)
    return dict(event.get_attributes()), event.get_data()


def same_attributes(event: Event, attributes: dict[str, Any]) -> None:
    """Every attribute the SDK sees, `event` has with the same value (times as the same instant)."""
    for name, value in attributes.items():
        if name == "time" and event.time is None:
            continue  # the core SDK makes up a time for an event that has none; nerve keeps none
        ours = getattr(event, name, None) if name in Event.__struct_fields__ else event.extensions.get(name)
        if isinstance(value, datetime):
            assert ours == value.astimezone(UTC), name
        elif name == "time":
            assert ours == datetime.fromisoformat(value), name
        else:
            assert ours == value, name
            assert type(ours) is type(value), name


# --- the SDK produces, nerve reads ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [classic, core], ids=["classic", "core"])
@pytest.mark.parametrize("data", DATA_KINDS, ids=lambda d: type(d).__name__)
def test_sdk_events_decode_with_every_attribute(make: Any, data: object) -> None:
    payload = make(ATTRIBUTES, data)
    event = decode(payload, Event)
    attributes, sdk_data = sdk_view(payload)
    same_attributes(event, attributes)
    assert event.data == sdk_data == data
    assert event.extensions == {"region": "eu", "floor": 3, "ratio": 0.25, "critical": True}
    # Again through nerve's own encodings: nothing lost.
    assert decode(to_msgpack(event), Event) == event
    assert decode(to_json(event), Event) == event


@pytest.mark.parametrize("make", [classic, core], ids=["classic", "core"])
def test_sdk_binary_data_is_data_base64(make: Any) -> None:
    event = decode(make({"type": "t", "source": "/s"}, b"\x00\x01\xff"), Event)
    assert event.data is None
    assert event.data_base64 == b"\x00\x01\xff"
    assert json.loads(to_json(event))["data_base64"] == "AAH/"


# --- nerve writes, the SDK reads --------------------------------------------------------------------------


@pytest.mark.parametrize("data", DATA_KINDS, ids=lambda d: type(d).__name__)
def test_nerve_json_parses_in_both_sdks(data: object) -> None:
    event = Event(
        source="nerve://edge/pi-01",
        type="nerve.events.door",
        subject="pi-01",
        time=datetime(2026, 11, 25, 4, 52, 40, 123456, tzinfo=UTC),
        datacontenttype="application/json",
        data=data,
        correlationid="chain-1",
        hops=2,
        extensions={"region": "eu", "floor": 3},
    )
    payload = to_json(event)
    attributes, sdk_data = sdk_view(payload)
    same_attributes(event, attributes)
    assert sdk_data == data
    assert attributes["hops"] == 2
    assert attributes["correlationid"] == "chain-1"
    old = classic_from_json(payload)
    assert old["id"] == event.id
    assert old["region"] == "eu"
    assert old.data == data


# --- properties: any valid CloudEvent ------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=20).filter(
    lambda n: n not in Event.__struct_encode_fields__ and n not in {"data", "data_base64"}
)
scalars = (
    st.text(max_size=20)
    | st.booleans()
    | st.integers(min_value=-(2**31), max_value=2**31 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    st.none() | scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
texts = st.text(min_size=1, max_size=40)
times = st.datetimes(
    min_value=datetime(1970, 1, 2),  # noqa: DTZ001
    max_value=datetime(9000, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
cloudevents = st.fixed_dictionaries(
    {"specversion": st.just("1.0"), "id": texts, "source": texts, "type": texts},
    optional={
        "subject": texts,
        "time": times.map(lambda t: t.isoformat().replace("+00:00", "Z")),
        "datacontenttype": st.sampled_from(["application/json", "text/plain", "application/vnd.x+json"]),
        "dataschema": st.sampled_from(["https://example.com/s.json", "urn:schema:1"]),
        "data": json_values.filter(lambda v: v is not None),
        "correlationid": texts,
        "hops": st.integers(min_value=0, max_value=1_000_000),
    },
).flatmap(lambda base: st.dictionaries(names, scalars, max_size=4).map(lambda ext: {**ext, **base}))


def normalized(document: dict[str, Any]) -> dict[str, Any]:
    """A document with its time as an instant (offsets and digits may be written differently).

    `hops` 0 is nerve's default, written as absent.
    """
    document = {k: v for k, v in document.items() if (k, v) != ("hops", 0)}
    if "time" in document:
        return {**document, "time": datetime.fromisoformat(document["time"])}
    return document


@given(document=cloudevents)
def test_any_valid_cloudevent_decodes_and_reencodes_with_the_same_attributes(
    document: dict[str, Any],
) -> None:
    payload = json.dumps(document).encode()
    event = decode(payload, Event)
    assert normalized(json.loads(to_json(event))) == normalized(document)
    assert decode(to_msgpack(event), Event) == event
    assert decode(to_json(event), Event) == event
    attributes, _ = sdk_view(to_json(event))
    same_attributes(event, attributes)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": ""}, r"at `\$\.id`"),
        ({"source": ""}, r"at `\$\.source`"),
        ({"type": None}, r"at `\$\.type`"),
        ({"source": 7}, r"Expected `str`, got `int` - at `\$\.source`"),
        ({"specversion": "0.3"}, r"at `\$\.specversion`"),
        ({"time": "25 Nov 2026"}, r"at `\$\.time`"),
        ({"data_base64": "AAE="}, "data and data_base64"),
        ({"Region": "eu"}, "attribute name 'Region' is not valid"),
        ({"trace_id": "x"}, "attribute name 'trace_id' is not valid"),
        ({"region": {"eu": 1}}, "extension 'region': a value must be a string, a number or a boolean"),
        ({"hops": -1}, r"at `\$\.hops`"),
    ],
)
def test_what_the_spec_forbids_is_refused_by_name(change: dict[str, Any], reason: str) -> None:
    document = {**json.loads(classic(ATTRIBUTES, {"door": "open"})), **change}
    with pytest.raises(DecodeError, match=reason):
        decode(json.dumps(document).encode(), Event)


@pytest.mark.parametrize("missing", ["specversion", "id", "source", "type"])
def test_missing_required_attribute_is_refused_by_name(missing: str) -> None:
    document = json.loads(classic(ATTRIBUTES, {"door": "open"}))
    del document[missing]
    with pytest.raises(DecodeError, match=f"missing required attribute `{missing}`"):
        decode(json.dumps(document).encode(), Event)


# --- through a real bridge ------------------------------------------------------------------------------


async def mosquitto_pub(settings: Settings, topic: str, payload: bytes) -> None:
    """Publish with mosquitto_pub (QoS 1): an MQTT client that is not nerve's."""
    url = urlsplit(settings.mqtt.url)
    process = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", url.hostname or "127.0.0.1", "-p", str(url.port), "-q", "1", "-t", topic, "-s",
        stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT):
        await process.communicate(payload)
    assert process.returncode == 0


def with_codec(settings: Settings, codec: Codec) -> Settings:
    return settings.model_copy(update={"nats": settings.nats.model_copy(update={"codec": codec})})


@pytest.mark.broker
@pytest.mark.parametrize("codec", list(Codec))
async def test_sdk_events_through_the_bridge_are_stored_unchanged(
    settings: Settings, nc: NatsClient, running: Running, codec: Codec
) -> None:
    js = nc.jetstream()
    sent = {
        "nerve/pi-01/events/door": [classic(ATTRIBUTES, {"door": "open"}), core(ATTRIBUTES, [1, 2, 3])],
        "nerve/pi-01/telemetry/disk": [
            classic({**ATTRIBUTES, "type": "com.example.disk"}, {"value": 95.5, "mount": "/"})
        ],
    }
    async with running(Bridge(settings=with_codec(settings, codec)), wait=WAIT):
        for topic, payloads in sent.items():
            for payload in payloads:
                await mosquitto_pub(settings, topic, payload)
        await wait_for_count(js, "NERVE_EVENTS", 2)
        await wait_for_count(js, "NERVE_TELEMETRY", 1)
    stored = await stream_messages(js, "NERVE_EVENTS") + await stream_messages(js, "NERVE_TELEMETRY")
    originals = [payload for payloads in sent.values() for payload in payloads]
    assert len(stored) == len(originals)
    for message, original in zip(stored, originals, strict=True):
        assert message.headers[CONTENT_TYPE_HEADER] == f"application/cloudevents+{codec.value}"
        event = decode(message.data, Event)
        assert message.headers["Nats-Msg-Id"] == event.id
        attributes, data = sdk_view(original)
        same_attributes(event, attributes)
        assert event.data == data
        if codec is Codec.JSON:
            # Structured JSON that was valid goes as it came: any CloudEvents reader takes it.
            assert message.data == original
            assert sdk_view(message.data) == (attributes, data)


@pytest.mark.broker
async def test_subject_is_the_topics_device(settings: Settings, nc: NatsClient, running: Running) -> None:
    js = nc.jetstream()
    without = {k: v for k, v in ATTRIBUTES.items() if k != "subject"}
    async with running(Bridge(settings=with_codec(settings, Codec.JSON)), wait=WAIT):
        await mosquitto_pub(settings, "nerve/pi-01/events/door", classic(without, {"door": "open"}))
        await mosquitto_pub(
            settings, "nerve/pi-01/events/door", classic({**ATTRIBUTES, "subject": "pi-02"}, {"door": "open"})
        )
        await wait_for_count(js, "NERVE_EVENTS", 1)
        await wait_for_count(js, "NERVE_DEADLETTER", 1)
    [stored] = await stream_messages(js, "NERVE_EVENTS")
    attributes, _ = sdk_view(stored.data)
    assert attributes["subject"] == "pi-01"
    assert attributes["region"] == "eu"
    [dead] = await stream_messages(js, "NERVE_DEADLETTER")
    assert "subject 'pi-02' names another device than the topic's 'pi-01'" in dead.headers["Nerve-Reason"]


# --- what nerve publishes itself --------------------------------------------------------------------------


@pytest.mark.broker
async def test_published_envelopes_carry_their_content_type_and_read_back_in_either_codec(
    nc: NatsClient,
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, "nerve")
    facts = [
        Fact(id=f"f-{codec.value}", source="t", type="nerve.fact.x", subject="pi-01", kind="x", summary=codec)
        for codec in Codec
    ]
    for fact, codec in zip(facts, Codec, strict=True):
        await publish_fact(js, fact, prefix="nerve", codec=codec)
    stored = await stream_messages(js, "NERVE_FACTS")
    assert [m.headers[CONTENT_TYPE_HEADER] for m in stored] == [content_type(codec) for codec in Codec]
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [fact.id for fact in facts]
    attributes, _ = sdk_view(stored[0].data)  # the JSON one: a CloudEvents SDK reads it as it is
    assert attributes["kind"] == "x"
    read, undecodable = await read_facts(js, prefix="nerve")
    assert (read, undecodable) == (facts, 0)
