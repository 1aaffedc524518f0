"""The sans-IO control-port parser and encoders (control-spec §2, §3, §4.1; tor.md §9)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.errors import ControlError
from rustbalance.tor.control_protocol import (
    ControlParser,
    ControlProtocolError,
    ControlReplyError,
    Event,
    HsDescContentEvent,
    HsDescEvent,
    Reply,
    decode_data_block,
    encode_command,
    encode_data_block,
    encode_data_command,
    format_keyword_arg,
    parse_authchallenge,
    parse_bootstrap_phase,
    parse_getconf,
    parse_getinfo,
    parse_hsdir,
    parse_keywords,
    parse_protocolinfo,
    quote_string,
    setconf_args,
    typed_event,
    unquote_string,
)
from tests.budget import budget

ADDR = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd"
FP = "2730B98E6E1B2A59C1D7D0A1D46B1C5E0A4A0C11"
BLINDED = "yFi9Wvi1mS3cHXqgJWk1kVj8QhlsXPwHdKfuQdS9ds4"


def one(parser: ControlParser, data: bytes) -> Reply | Event:
    items = parser.feed(data)
    assert len(items) == 1
    return items[0]


def test_single_line_reply() -> None:
    reply = one(ControlParser(), b"250 OK\r\n")
    assert isinstance(reply, Reply)
    assert reply.status == 250 and reply.is_success and reply.message == "OK"


def test_error_reply_raises_typed_error_with_code_and_message() -> None:
    reply = one(ControlParser(), b"554 Invalid descriptor\r\n")
    assert isinstance(reply, Reply) and not reply.is_success
    with pytest.raises(ControlReplyError) as info:
        reply.raise_for_status("HSPOST")
    assert info.value.code == 554
    assert info.value.tor_message == "Invalid descriptor"
    assert "HSPOST" in str(info.value)


def test_multi_line_getinfo_with_data_block() -> None:
    wire = (
        b"250-version=0.4.9.11\r\n"
        b"250+hs/client/desc/id/x=\r\n"
        b"hs-descriptor 3\r\n"
        b"..leading dot\r\n"
        b"signature abc\r\n"
        b".\r\n"
        b"250 OK\r\n"
    )
    reply = one(ControlParser(), wire)
    assert isinstance(reply, Reply)
    assert parse_getinfo(reply) == {
        "version": "0.4.9.11",
        "hs/client/desc/id/x": "hs-descriptor 3\n.leading dot\nsignature abc\n",
    }


def test_byte_by_byte_feed_gives_the_same_result() -> None:
    wire = (
        b"650 HS_DESC REQUESTED " + ADDR.encode() + b" NO_AUTH $" + FP.encode() + b"~relay003\r\n"
        b"250-a=1\r\n250+b=\r\nline\r\n.\r\n250 OK\r\n"
    )
    parser = ControlParser()
    items: list[Reply | Event] = []
    for i in range(len(wire)):
        items += parser.feed(wire[i : i + 1])
    assert [type(x) for x in items] == [Event, Reply]
    assert parser.feed(b"") == []
    assert parser.idle
    assert isinstance(items[1], Reply)
    assert parse_getinfo(items[1]) == {"a": "1", "b": "line\n"}


def test_events_interleaved_with_a_reply_are_routed_apart() -> None:
    wire = (
        b"250-a=1\r\n"
        b"650 HS_DESC RECEIVED " + ADDR.encode() + b" NO_AUTH $" + FP.encode() + b"~r1 "
        b"" + BLINDED.encode() + b"\r\n"
        b"650+HS_DESC_CONTENT "
        + ADDR.encode()
        + b" "
        + BLINDED.encode()
        + b" $"
        + FP.encode()
        + b"~r1\r\nhs-descriptor 3\r\n.\r\n650 OK\r\n"
        b"250 OK\r\n"
    )
    items = ControlParser().feed(wire)
    assert [type(x) for x in items] == [Event, Event, Reply]
    first, second, reply = items
    assert isinstance(reply, Reply) and parse_getinfo(reply) == {"a": "1"}
    assert isinstance(first, Event) and isinstance(second, Event)
    hs = typed_event(first)
    assert isinstance(hs, HsDescEvent)
    assert hs.action == "RECEIVED" and hs.address == ADDR and hs.descriptor_id == BLINDED
    content = typed_event(second)
    assert isinstance(content, HsDescContentEvent)
    assert content.descriptor == "hs-descriptor 3\n"
    assert content.hsdir_fingerprint == FP and content.hsdir_nickname == "r1"


def test_hs_desc_event_all_fields() -> None:
    line = (
        f"650 HS_DESC REQUESTED {ADDR} NO_AUTH ${FP}~relay003 {BLINDED} "
        f"HSDIR_INDEX=90EAB763 REPLICA=1 REASON=QUERY_REJECTED\r\n"
    )
    event = one(ControlParser(), line.encode())
    assert isinstance(event, Event) and event.type == "HS_DESC"
    hs = HsDescEvent.from_event(event)
    assert hs == HsDescEvent(
        action="REQUESTED",
        address=ADDR,
        auth_type="NO_AUTH",
        hsdir=f"${FP}~relay003",
        hsdir_fingerprint=FP,
        hsdir_nickname="relay003",
        descriptor_id=BLINDED,
        reason="QUERY_REJECTED",
        replica=1,
        hsdir_index="90EAB763",
    )


def test_hs_desc_uploaded_without_descriptor_id() -> None:
    event = one(ControlParser(), f"650 HS_DESC UPLOADED {ADDR} UNKNOWN ${FP}~r\r\n".encode())
    assert isinstance(event, Event)
    hs = HsDescEvent.from_event(event)
    assert hs.action == "UPLOADED" and hs.auth_type == "UNKNOWN" and hs.descriptor_id is None


def test_failed_fetch_content_event_has_empty_body() -> None:
    wire = f"650+HS_DESC_CONTENT UNKNOWN {BLINDED} ${FP}~r\r\n.\r\n650 OK\r\n".encode()
    event = one(ControlParser(), wire)
    assert isinstance(event, Event)
    content = HsDescContentEvent.from_event(event)
    assert content.address == "UNKNOWN" and content.descriptor == ""


def test_multi_line_event() -> None:
    wire = b"650-CONF_CHANGED\r\n650-SocksPort=0\r\n650 OK\r\n"
    event = one(ControlParser(), wire)
    assert isinstance(event, Event) and event.type == "CONF_CHANGED"
    assert [line.text for line in event.lines] == ["CONF_CHANGED", "SocksPort=0", "OK"]
    assert typed_event(event) is event


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (b"25O OK\r\n", "status"),
        (b"250*OK\r\n", "separator"),
        (b"25\r\n", "short"),
        (b"250-a=1\r\n251 OK\r\n", "inconsistent"),
        (b"hello world\r\n", "status"),
    ],
)
def test_garbage_raises_protocol_error(wire: bytes, words: str) -> None:
    parser = ControlParser()
    with pytest.raises(ControlProtocolError, match=words):
        parser.feed(wire)
    # The stream is out of sync for good: later input fails too.
    with pytest.raises(ControlProtocolError):
        parser.feed(b"250 OK\r\n")


def test_line_length_cap() -> None:
    parser = ControlParser(max_line_length=64, max_reply_size=1024)
    with pytest.raises(ControlProtocolError, match="line"):
        parser.feed(b"250-" + b"x" * 100)


def test_reply_size_cap_counts_data_blocks() -> None:
    parser = ControlParser(max_line_length=100, max_reply_size=1000)
    parser.feed(b"250+big=\r\n")
    with pytest.raises(ControlProtocolError, match="size limit"):
        for _ in range(100):
            parser.feed(b"y" * 50 + b"\r\n")


def test_default_cap_fits_a_large_consensus() -> None:
    body = b"r relay 0000 0000\r\n" * (8 * 1024 * 1024 // 19)
    wire = b"250+md/all=\r\n" + body + b".\r\n250 OK\r\n"
    reply = one(ControlParser(), wire)
    assert isinstance(reply, Reply)
    assert len(parse_getinfo(reply)["md/all"]) == len(body) // 19 * 18


def test_getconf_forms() -> None:
    wire = (
        b"250-SocksPort=0\r\n"
        b"250-HiddenServicePort=80 127.0.0.1:8080\r\n"
        b"250-HiddenServicePort=81 127.0.0.1:8081\r\n"
        b'250-Nickname="a \\"b\\""\r\n'
        b"250 ContactInfo\r\n"
    )
    reply = one(ControlParser(), wire)
    assert isinstance(reply, Reply)
    assert parse_getconf(reply) == {
        "SocksPort": ["0"],
        "HiddenServicePort": ["80 127.0.0.1:8080", "81 127.0.0.1:8081"],
        "Nickname": ['a "b"'],
        "ContactInfo": [],
    }


def test_protocolinfo() -> None:
    wire = (
        b"250-PROTOCOLINFO 1\r\n"
        b'250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE="/var/lib/tor/control_auth_cookie"\r\n'
        b'250-VERSION Tor="0.4.9.11"\r\n'
        b"250 OK\r\n"
    )
    reply = one(ControlParser(), wire)
    assert isinstance(reply, Reply)
    info = parse_protocolinfo(reply)
    assert info.protocol_version == 1
    assert info.auth_methods == {"COOKIE", "SAFECOOKIE"}
    assert info.cookie_file == "/var/lib/tor/control_auth_cookie"
    assert info.tor_version == "0.4.9.11"


def test_protocolinfo_without_auth_line_is_an_error() -> None:
    reply = one(ControlParser(), b"250-PROTOCOLINFO 1\r\n250 OK\r\n")
    assert isinstance(reply, Reply)
    with pytest.raises(ControlProtocolError, match="AUTH"):
        parse_protocolinfo(reply)


def test_authchallenge() -> None:
    wire = b"250 AUTHCHALLENGE SERVERHASH=" + b"AB" * 32 + b" SERVERNONCE=" + b"cd" * 32 + b"\r\n"
    reply = one(ControlParser(), wire)
    assert isinstance(reply, Reply)
    challenge = parse_authchallenge(reply)
    assert challenge.server_hash == b"\xab" * 32 and challenge.server_nonce == b"\xcd" * 32
    bad = one(ControlParser(), b"250 AUTHCHALLENGE SERVERHASH=zz SERVERNONCE=00\r\n")
    assert isinstance(bad, Reply)
    with pytest.raises(ControlProtocolError, match="SERVERHASH"):
        parse_authchallenge(bad)


def test_hsdir_forms() -> None:
    assert parse_hsdir(f"${FP.lower()}~nick") == (FP, "nick")
    assert parse_hsdir(f"${FP}=nick") == (FP, "nick")
    assert parse_hsdir(f"${FP}") == (FP, None)
    assert parse_hsdir("UNKNOWN") == (None, None)
    with pytest.raises(ControlProtocolError):
        parse_hsdir("$1234~short")


def test_quote_and_unquote_round_trip() -> None:
    raw = 'pass "word" with \\ and\nnewline\ttab'
    quoted = quote_string(raw)
    assert "\n" not in quoted and quoted.startswith('"')
    assert unquote_string(quoted) == (raw, len(quoted))
    assert unquote_string(r'"\101\x42"') == ("AB", 10)
    with pytest.raises(ControlError):
        quote_string("bell\x07")


def test_keywords_tokenizer() -> None:
    positional, kw = parse_keywords('A B K=v Q="x y" E=')
    assert positional == ["A", "B"]
    assert kw == {"K": "v", "Q": "x y", "E": ""}
    with pytest.raises(ControlProtocolError, match="unterminated"):
        parse_keywords('K="open')


def test_encode_command_refuses_injection() -> None:
    assert encode_command("GETINFO", "version") == b"GETINFO version\r\n"
    with pytest.raises(ControlError):
        encode_command("GETINFO", "version\r\nSIGNAL HALT")
    with pytest.raises(ControlError):
        encode_command("BAD CMD")


def test_setconf_args() -> None:
    args = setconf_args(
        {"SocksPort": "0", "HiddenServicePort": ["80 127.0.0.1:1"], "Nickname": None}
    )
    assert args == ["SocksPort=0", 'HiddenServicePort="80 127.0.0.1:1"', "Nickname"]
    assert format_keyword_arg("K", "") == 'K=""'


def test_data_block_encoding() -> None:
    assert encode_data_block("a\n.b\n..c\n") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert encode_data_block("no newline") == b"no newline\r\n.\r\n"
    assert encode_data_block("") == b".\r\n"
    assert encode_data_command("HSPOST", ["HSADDRESS=x"], ".\n") == (
        b"+HSPOST HSADDRESS=x\r\n..\r\n.\r\n"
    )


line_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"),
    max_size=30,
)


@settings(max_examples=budget(300), deadline=None)
@given(st.lists(line_text, max_size=20))
def test_data_block_round_trip(lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    block = encode_data_block(text)
    assert decode_data_block(block) == text
    # And through the reply parser, as tor would send it back.
    reply = one(ControlParser(), b"250+k=\r\n" + block + b"250 OK\r\n")
    assert isinstance(reply, Reply)
    assert parse_getinfo(reply) == {"k": text}


@settings(max_examples=budget(400), deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_random_bytes_raise_only_control_errors(data: bytes, chunk: int) -> None:
    parser = ControlParser(max_line_length=64, max_reply_size=256)
    try:
        for i in range(0, len(data), chunk):
            for item in parser.feed(data[i : i + chunk]):
                if isinstance(item, Event):
                    typed_event(item)
                else:
                    for parse in (parse_getinfo, parse_getconf, parse_protocolinfo):
                        with contextlib.suppress(ControlError):
                            parse(item)
    except ControlError:
        pass


reply_line = st.text(alphabet='ABCDEFGHIJ=" \\$~0123456789-+.xyz', max_size=40)


@settings(max_examples=budget(400), deadline=None)
@given(
    st.sampled_from([250, 650, 551]),
    st.sampled_from(["", "HS_DESC ", "HS_DESC_CONTENT ", "PROTOCOLINFO ", "AUTH METHODS="]),
    st.lists(reply_line, min_size=1, max_size=5),
)
def test_structured_garbage_raises_only_control_errors(
    status: int, prefix: str, texts: list[str]
) -> None:
    texts[0] = prefix + texts[0]
    wire = "".join(f"{status}-{t}\r\n" for t in texts[:-1]) + f"{status} {texts[-1]}\r\n"
    try:
        item = one(ControlParser(), wire.encode())
        if isinstance(item, Event):
            typed_event(item)
        else:
            for parse in (parse_getinfo, parse_getconf, parse_protocolinfo, parse_authchallenge):
                with contextlib.suppress(ControlError):
                    parse(item)
    except ControlError:
        pass


# --- status/bootstrap-phase (system mode's readiness, issue 17) --------------------------------


def test_bootstrap_phase_gives_the_percentage() -> None:
    # As tor 0.4.8 answers GETINFO status/bootstrap-phase (control-spec §4.1.10).
    assert parse_bootstrap_phase('NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"') == 100
    assert (
        parse_bootstrap_phase(
            'NOTICE BOOTSTRAP PROGRESS=14 TAG=handshake SUMMARY="Handshaking with a relay"'
        )
        == 14
    )
    assert (
        parse_bootstrap_phase(
            'WARN BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting" WARNING="x" REASON=TIMEOUT'
        )
        == 5
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "NOTICE CIRCUIT_ESTABLISHED",
        "NOTICE BOOTSTRAP TAG=done",
        "NOTICE BOOTSTRAP PROGRESS=101",
        "NOTICE BOOTSTRAP PROGRESS=-1",
        "NOTICE BOOTSTRAP PROGRESS=١٠",  # digits, but not ASCII ones
        'NOTICE BOOTSTRAP PROGRESS="',
    ],
)
def test_a_bad_bootstrap_phase_is_a_control_error(bad: str) -> None:
    with pytest.raises(ControlError):
        parse_bootstrap_phase(bad)


@settings(max_examples=budget(300), deadline=None)
@given(st.text(max_size=120))
def test_any_bootstrap_phase_text_is_a_percentage_or_a_control_error(text: str) -> None:
    with contextlib.suppress(ControlError):
        assert 0 <= parse_bootstrap_phase(text) <= 100
