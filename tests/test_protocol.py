"""Host-link framing (bitdet.core.protocol): CRC, round trips, parser resync, responses."""

import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bitdet.core.config import AcceleratorConfig
from bitdet.core.protocol import (
    COMMAND_PAYLOAD_LIMITS,
    CRC_CHECK,
    CRC_COVERED_HEADER,
    CRC_INIT,
    CRC_PERIOD,
    CRC_POLY,
    ERROR_OPCODE,
    FRAME_OVERHEAD,
    LAYER_DESCRIPTOR_SIZE,
    LAYER_FLAG_PAD_BIT,
    LAYER_FLAG_POOL,
    LAYER_FLAG_RAW,
    LAYER_TABLE_ENTRIES,
    MAGIC,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    RESPONSE_FLAG,
    TIMEOUT_BYTE_TIMES,
    DeviceError,
    ErrorCode,
    Frame,
    FrameError,
    FrameParser,
    IdentifyReply,
    Opcode,
    ProtocolError,
    Response,
    crc16,
    crc16_update,
    decode_layer,
    decode_layer_entry,
    encode_error,
    encode_frame,
    encode_layer,
    encode_response,
    parse_response,
)


def crc16_bitwise(data: bytes) -> int:
    """CRC-16/IBM-3740 straight from its definition (MSB first, poly 0x1021)."""
    crc = CRC_INIT
    for byte in data:
        for bit in range(7, -1, -1):
            feedback = ((crc >> 15) & 1) ^ ((byte >> bit) & 1)
            crc = (crc << 1) & 0xFFFF
            if feedback:
                crc ^= CRC_POLY
    return crc


@st.composite
def commands(draw):
    """A valid command: a known opcode with a payload length in its range (kept short)."""
    opcode = draw(st.sampled_from(sorted(COMMAND_PAYLOAD_LIMITS)))
    low, high = COMMAND_PAYLOAD_LIMITS[opcode]
    payload = draw(st.binary(min_size=low, max_size=min(high, low + 40)))
    return Frame(opcode, payload)


no_magic = st.binary(max_size=20).map(lambda b: bytes(x for x in b if x != MAGIC))


# -- CRC ---------------------------------------------------------------------------------------

def test_crc_catalogue_check_value():
    assert crc16(b"123456789") == CRC_CHECK == 0x29B1
    assert crc16(b"") == CRC_INIT


@given(st.binary(max_size=64))
def test_crc_table_equals_definition_and_update(data):
    assert crc16(data) == crc16_bitwise(data)
    crc = CRC_INIT
    for byte in data:
        crc = crc16_update(crc, byte)
    assert crc == crc16(data)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255))
def test_crc_update_is_linear(crc_a, crc_b, byte_a, byte_b):
    """The hardware builds its XOR network on this property."""
    assert crc16_update(crc_a ^ crc_b, byte_a ^ byte_b) == \
        crc16_update(crc_a, byte_a) ^ crc16_update(crc_b, byte_b)


@given(commands())
def test_residue_of_a_frame_is_zero(frame):
    """CRC sent MSB first: the CRC over opcode … CRC is 0 (what the decoder checks)."""
    data = encode_frame(frame.opcode, frame.payload)
    assert crc16(data[1:]) == 0
    assert int.from_bytes(data[-2:], "big") == crc16(data[1:-2])


# -- encoding ----------------------------------------------------------------------------------

def test_frame_layout():
    data = encode_frame(Opcode.WRITE_ACTIVATIONS, b"\x10\x00\x00\x00\xAA", seq=0x5C)
    assert data[0] == MAGIC
    assert data[1] == Opcode.WRITE_ACTIVATIONS
    assert struct.unpack_from("<H", data, 2)[0] == 5
    assert data[4] == 0x5C                                   # seq, after the length
    assert data[5:10] == b"\x10\x00\x00\x00\xAA"
    assert len(data) == 5 + 5 + 2 == 5 + FRAME_OVERHEAD
    (frame,) = FrameParser().feed(data)
    assert frame == Frame(Opcode.WRITE_ACTIVATIONS, data[5:10], 0x5C)

def test_documented_examples():
    """The byte-level examples of docs/protocol.md."""
    assert encode_frame(Opcode.IDENTIFY, seq=1).hex(" ") == "b1 01 00 00 01 e2 55"
    assert encode_error(ErrorCode.BAD_CRC, Opcode.RUN_LAYER, seq=7).hex(" ") == \
        "b1 ff 02 00 07 01 21 9c ce"
    assert encode_error(ErrorCode.TIMEOUT).hex(" ") == "b1 ff 02 00 00 04 00 d2 e8"
    write = encode_frame(Opcode.WRITE_ACTIVATIONS, bytes.fromhex("10000000deadbeef"), seq=2)
    assert write.hex(" ") == "b1 12 08 00 02 10 00 00 00 de ad be ef 28 49"
    assert encode_response(Opcode.WRITE_ACTIVATIONS, seq=2).hex(" ") == "b1 92 01 00 02 00 63 d3"
    reply = IdentifyReply(2, 4089, "b55849b0f3987e35").pack()
    assert encode_response(Opcode.IDENTIFY, ErrorCode.OK, reply, seq=1).hex(" ") == \
        "b1 81 0c 00 01 00 02 f9 0f b5 58 49 b0 f3 98 7e 35 0b 2b"


def test_encode_frame_rejects_bad_arguments():
    with pytest.raises(ValueError, match="opcode must be"):
        encode_frame(256)
    with pytest.raises(ValueError, match="opcode must be"):
        encode_frame(True)
    with pytest.raises(ValueError, match="exceeds MAX_PAYLOAD"):
        encode_frame(Opcode.WRITE_WEIGHTS, bytes(MAX_PAYLOAD + 1))
    assert len(encode_frame(Opcode.WRITE_WEIGHTS, bytes(MAX_PAYLOAD))) == MAX_PAYLOAD + 7
    with pytest.raises(ValueError, match="seq must be"):
        encode_frame(Opcode.IDENTIFY, seq=256)
    with pytest.raises(ValueError, match="command opcode"):
        encode_response(0x80)
    with pytest.raises(ValueError, match="max_payload"):
        FrameParser(max_payload=70000)


def test_opcodes_and_limits_are_consistent():
    assert set(COMMAND_PAYLOAD_LIMITS) == set(Opcode)
    for opcode, (low, high) in COMMAND_PAYLOAD_LIMITS.items():
        assert 0 < opcode < RESPONSE_FLAG
        assert 0 <= low <= high <= MAX_PAYLOAD
    assert MAGIC not in set(Opcode)
    assert len({int(code) for code in ErrorCode}) == len(ErrorCode)


# -- parsing -----------------------------------------------------------------------------------

@given(st.lists(commands(), max_size=6), st.data())
def test_round_trip_in_any_chunking(frames, data):
    stream = b"".join(encode_frame(f.opcode, f.payload) for f in frames)
    parser = FrameParser()
    events = []
    position = 0
    while position < len(stream):
        size = data.draw(st.integers(1, 16))
        events += parser.feed(stream[position:position + size])
        position += size
    assert events == frames
    assert not parser.in_frame


@given(st.lists(st.tuples(no_magic, commands()), max_size=6), no_magic)
def test_garbage_without_magic_between_frames_is_skipped(pairs, tail):
    stream = b"".join(junk + encode_frame(f.opcode, f.payload) for junk, f in pairs) + tail
    assert FrameParser().feed(stream) == [f for _, f in pairs]


@given(st.lists(st.tuples(st.binary(max_size=24), commands()), min_size=1, max_size=5))
def test_any_garbage_then_timeout_then_frame_is_served(pairs):
    """Arbitrary bytes (MAGIC included) can start a false frame; after the inter-byte
    timeout the parser hunts again and the next frame is served."""
    parser = FrameParser()
    for junk, frame in pairs:
        events = parser.feed(junk)
        assert all(isinstance(e, (Frame, FrameError)) for e in events)
        parser.expire()
        assert parser.feed(encode_frame(frame.opcode, frame.payload)) == [frame]


@given(commands(), st.data())
def test_bit_flip_is_never_accepted(frame, data):
    """One bit flipped anywhere but MAGIC and the length: the first error is BAD_CRC,
    UNKNOWN_OPCODE or (the opcode became another known one) BAD_LENGTH; never a frame."""
    encoded = bytearray(encode_frame(frame.opcode, frame.payload))
    position = data.draw(st.sampled_from([1, *range(4, len(encoded))]))
    encoded[position] ^= 1 << data.draw(st.integers(0, 7))
    parser = FrameParser()
    events = parser.feed(bytes(encoded))
    # after BAD_LENGTH the rest of the frame is hunted and may hold a MAGIC: time it out
    events += [e for e in [parser.expire()] if e is not None]
    assert events and all(isinstance(e, FrameError) for e in events)
    assert events[0].code in (ErrorCode.BAD_CRC, ErrorCode.UNKNOWN_OPCODE, ErrorCode.BAD_LENGTH)
    if position >= 4:                       # the frame's extent was intact
        assert events == [FrameError(ErrorCode.BAD_CRC, frame.opcode, encoded[4])]
    assert parser.feed(encode_frame(Opcode.RESET)) == [Frame(Opcode.RESET, b"")]


@given(commands(), st.data())
def test_corrupt_length_recovers_after_timeout(frame, data):
    encoded = bytearray(encode_frame(frame.opcode, frame.payload))
    encoded[data.draw(st.sampled_from([2, 3]))] ^= 1 << data.draw(st.integers(0, 7))
    parser = FrameParser()
    events = parser.feed(bytes(encoded))
    expired = parser.expire()
    events += [expired] if expired else []
    assert all(isinstance(e, FrameError) for e in events)
    assert parser.feed(encode_frame(Opcode.IDENTIFY)) == [Frame(Opcode.IDENTIFY, b"")]


@given(commands(), st.data())
def test_truncated_frame_times_out_with_its_opcode(frame, data):
    encoded = encode_frame(frame.opcode, frame.payload)
    cut = data.draw(st.integers(1, len(encoded) - 1))
    parser = FrameParser()
    assert parser.feed(encoded[:cut]) == []
    assert parser.in_frame
    assert parser.expire() == FrameError(ErrorCode.TIMEOUT, frame.opcode if cut > 1 else 0)
    assert parser.expire() is None
    assert parser.feed(encoded) == [frame]


def test_unknown_opcode_and_bad_length():
    parser = FrameParser()
    assert parser.feed(encode_frame(0x05, b"hello")) == \
        [FrameError(ErrorCode.UNKNOWN_OPCODE, 0x05)]
    # a corrupt unknown opcode is reported as BAD_CRC: the CRC is checked first
    bad = bytearray(encode_frame(0x05, b"hello"))
    bad[-1] ^= 1
    assert parser.feed(bad) == [FrameError(ErrorCode.BAD_CRC, 0x05)]
    # length checked at once, then the rest of the frame is hunted for MAGIC
    assert parser.feed(encode_frame(Opcode.IDENTIFY, b"\x00\x00")) == \
        [FrameError(ErrorCode.BAD_LENGTH, Opcode.IDENTIFY)]
    assert not parser.in_frame
    assert parser.feed(bytes([MAGIC, 0x05, 0xFA, 0x0F])) == \
        [FrameError(ErrorCode.BAD_LENGTH, 0x05)]                   # 4090 > MAX_PAYLOAD
    assert FrameParser(payload_limits=None).feed(encode_frame(0x05, b"hello")) == \
        [Frame(0x05, b"hello")]


def test_resync_does_not_re_read_consumed_bytes():
    """Documented limitation (shared with the hardware): a MAGIC inside a dropped frame's
    bytes starts the next hunt only from the byte after the error."""
    identify = encode_frame(Opcode.IDENTIFY)
    events = FrameParser().feed(bytes([MAGIC]) + identify + identify)
    # MAGIC, MAGIC(opcode) 01 00 (length 1) 00 (seq) 00 (payload) F2 74 (CRC): BAD_CRC;
    # the first IDENTIFY is gone, the second one is served.
    assert events == [FrameError(ErrorCode.BAD_CRC, MAGIC), Frame(Opcode.IDENTIFY, b"")]


# -- responses and host exceptions -------------------------------------------------------------

@given(st.sampled_from(list(Opcode)), st.sampled_from(list(ErrorCode)),
       st.binary(max_size=MAX_PAYLOAD - 1))
def test_response_round_trip(opcode, status, data):
    frames = FrameParser(payload_limits=None).feed(encode_response(opcode, status, data))
    assert len(frames) == 1 and frames[0].opcode == RESPONSE_FLAG | opcode
    response = parse_response(frames[0])
    assert response == Response(opcode, status, data)
    if status == ErrorCode.OK:
        assert response.raise_for_status() is response
    else:
        with pytest.raises(DeviceError) as info:
            response.raise_for_status()
        assert info.value.code == status and info.value.opcode == opcode


def test_error_response():
    data = encode_error(ErrorCode.BAD_CRC, Opcode.RUN_LAYER)
    assert data[1] == ERROR_OPCODE
    (frame,) = FrameParser(payload_limits=None).feed(data)
    response = parse_response(frame)
    assert response == Response(Opcode.RUN_LAYER, ErrorCode.BAD_CRC, b"", framing=True)
    with pytest.raises(DeviceError, match=r"BAD_CRC \(command RUN_LAYER\)"):
        response.raise_for_status()
    assert "unknown status 0x7E" in str(DeviceError(0x7E, 0x55))


def test_malformed_responses_raise_protocol_error():
    with pytest.raises(ProtocolError, match="not a response"):
        parse_response(Frame(Opcode.IDENTIFY, b"\x00"))
    with pytest.raises(ProtocolError, match="without a status"):
        parse_response(Frame(RESPONSE_FLAG | Opcode.IDENTIFY, b""))
    with pytest.raises(ProtocolError, match="expected 2"):
        parse_response(Frame(ERROR_OPCODE, b"\x01"))
    with pytest.raises(ProtocolError, match="expected 11"):
        IdentifyReply.unpack(b"\x01\x00")


def test_identify_reply_carries_version_and_config_hash():
    config = AcceleratorConfig()
    reply = IdentifyReply.for_config(config)
    packed = reply.pack()
    assert len(packed) == IdentifyReply.SIZE == 11
    assert packed[0] == PROTOCOL_VERSION
    assert packed[3:].hex() == config.config_hash()
    assert IdentifyReply.unpack(packed) == reply
    frame = encode_response(Opcode.IDENTIFY, ErrorCode.OK, packed)
    (parsed,) = FrameParser(payload_limits=None).feed(frame)
    assert IdentifyReply.unpack(parse_response(parsed).raise_for_status().data) == reply
    with pytest.raises(ValueError, match="16 hex digits"):
        IdentifyReply(1, MAX_PAYLOAD, "abcd").pack()


@given(st.binary(max_size=200))
def test_parser_never_raises_on_arbitrary_input(data):
    assume(data)
    for limits in (COMMAND_PAYLOAD_LIMITS, None):
        parser = FrameParser(payload_limits=limits)
        events = parser.feed(data)
        assert all(isinstance(e, (Frame, FrameError)) for e in events)
        parser.expire()
        assert not parser.in_frame


POOL_DESCRIPTOR = {"in_h": 9, "in_w": 7, "channels": 11, "out_h": 4, "out_w": 3,
                   "out_channels": 11, "kernel": 3, "stride": 2, "padding": 0, "pad_bit": 0,
                   "input_base": 200, "output_base": 11, "weight_base": 0,
                   "threshold_base": 0, "raw": 0, "pool": 1}


def test_layer_flags_and_pool_descriptor():
    """Flag bits are distinct; a pool descriptor sets flags bit 2 (byte 15) and nothing
    else, round-trips with ``pool`` 1; a conv decodes with ``pool`` 0."""
    assert (LAYER_FLAG_PAD_BIT, LAYER_FLAG_RAW, LAYER_FLAG_POOL) == (0x01, 0x02, 0x04)
    payload = encode_layer(**POOL_DESCRIPTOR)
    assert len(payload) == LAYER_DESCRIPTOR_SIZE
    assert payload[15] == 0x04
    assert struct.unpack_from("<6H3B", payload) == (9, 7, 11, 4, 3, 11, 3, 2, 0)
    assert decode_layer(payload) == POOL_DESCRIPTOR
    conv = {**POOL_DESCRIPTOR, "pool": 0, "pad_bit": 1}
    assert encode_layer(**conv)[15] == 0x01
    assert decode_layer(encode_layer(**conv)) == conv
    without = dict(conv)
    del without["pool"]                             # pool defaults to False
    assert encode_layer(**without) == encode_layer(**conv)
    # raw and pool together are representable (the device refuses them)
    assert decode_layer(encode_layer(**{**POOL_DESCRIPTOR, "raw": 1}))["raw"] == 1


def test_layer_table_payloads():
    """33-byte CONFIGURE_LAYER ``[index] + descriptor``; RUN_NETWORK takes one count byte."""
    for index in (0, 5, LAYER_TABLE_ENTRIES - 1):
        payload = encode_layer(**POOL_DESCRIPTOR, index=index)
        assert payload == bytes([index]) + encode_layer(**POOL_DESCRIPTOR)
        assert decode_layer_entry(payload) == (index, POOL_DESCRIPTOR)
    assert decode_layer_entry(encode_layer(**POOL_DESCRIPTOR)) == (0, POOL_DESCRIPTOR)
    for index in (-1, LAYER_TABLE_ENTRIES, True):
        with pytest.raises(ValueError, match="index"):
            encode_layer(**POOL_DESCRIPTOR, index=index)
    with pytest.raises(ProtocolError):
        decode_layer_entry(bytes(34))
    with pytest.raises(ProtocolError):
        decode_layer(encode_layer(**POOL_DESCRIPTOR, index=1))
    low, high = COMMAND_PAYLOAD_LIMITS[Opcode.CONFIGURE_LAYER]
    assert low <= LAYER_DESCRIPTOR_SIZE < LAYER_DESCRIPTOR_SIZE + 1 <= high
    assert COMMAND_PAYLOAD_LIMITS[Opcode.RUN_NETWORK] == (1, 1)
    assert COMMAND_PAYLOAD_LIMITS[Opcode.RUN_LAYER] == (0, 1)


# -- error detection of the longest frame -----------------------------------------------------

def _poly_mod(value: int, poly: int) -> int:
    """``value`` mod ``poly``, both GF(2) polynomials as integers (bit i = x**i)."""
    degree = poly.bit_length() - 1
    while value.bit_length() - 1 >= degree:
        value ^= poly << (value.bit_length() - 1 - degree)
    return value


def _max_codeword_bits() -> int:
    """Bits of the longest frame's codeword: the CRC-covered bytes and the CRC."""
    return 8 * (CRC_COVERED_HEADER + MAX_PAYLOAD) + 16


def test_max_payload_keeps_every_frame_within_the_crc_period():
    """Two flips ``d`` bits apart escape the CRC iff ``x**d ≡ 1 (mod g)``: exhaustively, no
    ``d`` below the longest codeword does, and ``d = CRC_PERIOD`` does (the cap is tight
    enough and needed); odd numbers of flips are caught by the factor ``x + 1`` of g."""
    g = 0x10000 | CRC_POLY
    n = _max_codeword_bits()
    assert n <= CRC_PERIOD < n + 8 + 8          # one more payload byte would exceed it
    assert MAX_PAYLOAD == 4089 and PROTOCOL_VERSION == 2
    assert bin(g).count("1") % 2 == 0           # g(1) = 0: x + 1 divides g
    power = 1                                   # x**d mod g
    for d in range(1, n):
        power = _poly_mod(power << 1, g)
        assert power != 1, f"two flips {d} bits apart would pass"
    for _d in range(n, CRC_PERIOD + 1):
        power = _poly_mod(power << 1, g)
    assert power == 1                           # the period: 2 flips 32767 bits apart pass
    # every frame the protocol allows is at most that long
    assert max(high for _low, high in COMMAND_PAYLOAD_LIMITS.values()) <= MAX_PAYLOAD
    assert len(encode_frame(Opcode.WRITE_WEIGHTS, bytes(MAX_PAYLOAD))) * 8 - 8 == n


def test_random_three_bit_errors_in_the_longest_frame_are_detected():
    """Randomised: 1, 2 and 3 flips anywhere in a maximum-size frame (after MAGIC) are
    BAD_CRC for the parser. The CRC is linear: a flip pattern ``e`` passes iff the
    zero-init CRC of ``e`` is 0, so the patterns are checked on ``e`` alone."""
    import random
    rng = random.Random(2024)
    frame = encode_frame(Opcode.WRITE_WEIGHTS, bytes(rng.randrange(256)
                                                     for _ in range(MAX_PAYLOAD)), seq=9)
    body_bits = (len(frame) - 1) * 8
    # the length field must survive for the parser to read the frame: flip elsewhere too
    for flips in [1, 2, 3] * 100:
        positions = rng.sample(range(body_bits), flips)
        pattern = bytearray(len(frame) - 1)
        for bit in positions:
            pattern[bit // 8] ^= 0x80 >> (bit % 8)
        assert crc16(pattern, 0) != 0, positions
    # and end to end through the parser, away from the length field
    for flips in (1, 2, 3) * 10:
        damaged = bytearray(frame)
        for bit in rng.sample(range(4 * 8, body_bits), flips):
            damaged[1 + bit // 8] ^= 0x80 >> (bit % 8)
        assert FrameParser().feed(damaged) == [FrameError(ErrorCode.BAD_CRC,
                                                          damaged[1], damaged[4])]


# -- sequence bytes ------------------------------------------------------------------------------

def test_seq_is_carried_and_echoed():
    parser = FrameParser()
    (frame,) = parser.feed(encode_frame(Opcode.RESET, seq=0xA7))
    assert frame.seq == 0xA7
    (reply,) = FrameParser(payload_limits=None).feed(encode_response(Opcode.RESET, seq=0xA7))
    assert parse_response(reply) == Response(Opcode.RESET, ErrorCode.OK, b"", seq=0xA7)
    (error,) = FrameParser(payload_limits=None).feed(
        encode_error(ErrorCode.TIMEOUT, Opcode.RESET, seq=0xA7))
    assert parse_response(error).seq == 0xA7 and parse_response(error).framing
    # a frame that breaks off before its seq byte reports seq 0, after it its seq
    parser.feed(encode_frame(Opcode.RUN_LAYER, b"\x01", seq=5)[:4])
    assert parser.expire() == FrameError(ErrorCode.TIMEOUT, Opcode.RUN_LAYER, 0)
    parser.feed(encode_frame(Opcode.RUN_LAYER, b"\x01", seq=5)[:5])
    assert parser.expire() == FrameError(ErrorCode.TIMEOUT, Opcode.RUN_LAYER, 5)
    assert TIMEOUT_BYTE_TIMES == 1024


def test_property_tests_have_no_deadline():
    """The conftest profile: a slow example on a loaded machine is not a failure."""
    from hypothesis import settings
    assert settings().deadline is None
