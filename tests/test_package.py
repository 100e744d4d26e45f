"""The .mpkg package (mpskernels/ml_package.py): round trip of every IR op, and a malformed or
truncated file raises PackageError saying what and where (never a crash)."""
import json
import struct

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import ml, ml_package


def every_op_network(rng):
    net = ml.Network("all")
    x = net.input("x", (-1, 6, 7, 5))
    c = net.conv2d(x, rng.standard_normal((8, 3, 3, 5)), rng.standard_normal(8), pads=(1, 1, 1, 1),
                   neuron=mk.NNNeuronDescriptor(mk.CNNNeuronType.RELUN, 0.0, 2.0))
    p = net.pool2d(c, "max", (2, 2), (2, 2), ceil_mode=True)
    q = net.pool2d(p, "average", (3, 3), pads=(1, 1, 1, 1), count_include_pad=True)
    s = net.add(q, net.constant(rng.standard_normal(8)), clamp=(0.0, np.inf))
    n = net.neuron(s, mk.CNNNeuronType.PRELU, prelu=rng.standard_normal(8))
    m = net.mul(net.sub(n, net.constant(0.5)), net.constant(rng.standard_normal((1, 1, 1, 8))))
    m = net.concat(m, net.neuron(m, mk.CNNNeuronType.TANH, 1.0, 1.0), axis=3)
    g = net.pool2d(net.div(m, net.constant(2.0)), "average")
    f = net.reshape(net.transpose(g, (0, 3, 1, 2)), (-1, 16))
    net.output(net.gemm(f, rng.standard_normal((4, 16)), rng.standard_normal(4),
                        mk.NNNeuronDescriptor(mk.CNNNeuronType.SIGMOID)), "y")
    net.output(p, "pooled")
    u = net.conv_transpose2d(p, rng.standard_normal((3, 2, 2, 8)), None, (2, 2), pads=(0, 0, 1, 1))
    r = net.resize_linear(u, [0, 1], [1, 2], [0.5, 0.25], [0, 2], [1, 2], [0.5, 0.0])
    v = net.gather(net.softmax(r), [None, [1, -1], None, [2, 1]], value=1.0)
    w = net.layer_norm(net.unary(v, "erf"), rng.standard_normal(2), axis=-1)
    net.output(net.matmul(net.reduce(w, "mean", (1,)), w, transpose_b=True), "z")
    return net


def test_round_trip_every_op(device, rng, tmp_path):
    net = every_op_network(rng)
    assert {n.kind for n in net.nodes} == set(ml.Network.OPS)
    path = tmp_path / "all.mpkg"
    ml_package.save_package(net, path)
    loaded = device.make_library(str(path))
    assert loaded.function_names == ["all"]
    a = rng.standard_normal((3, 6, 7, 5), dtype=np.float32)
    ys = []
    for lib in (ml.Library(device, net), loaded):
        ys.append(ml.Session(lib, device=device).run({"x": a}))
    for k in ("y", "pooled", "z"):
        assert ys[0][k].tobytes() == ys[1][k].tobytes()
    assert ys[0]["y"].shape == (3, 4)


def test_file_layout(rng):
    data = ml_package.package_bytes(every_op_network(rng))
    magic, version, hlen, base, blen = struct.unpack_from("<8sIIQQ", data)
    assert magic == ml_package.MAGIC and version == 1
    assert base % 64 == 0 and base + blen == len(data)
    header = json.loads(data[32:32 + hlen])
    assert all(offset % 64 == 0 for _, _, offset, _ in header["arrays"])


def _bad(data, match):
    with pytest.raises(ml_package.PackageError, match=match):
        ml_package.load_package_bytes(data, "bad.mpkg")


def _with_header(data, edit):
    magic, version, hlen, base, blen = struct.unpack_from("<8sIIQQ", data)
    header = json.loads(data[32:32 + hlen])
    edit(header)
    text = json.dumps(header).encode()
    new_base = -(-(32 + len(text)) // 64) * 64
    return (struct.pack("<8sIIQQ", magic, version, len(text), new_base, blen) + text
            + b"\0" * (new_base - 32 - len(text)) + data[base:])


def test_malformed_packages(rng):
    good = ml_package.package_bytes(every_op_network(rng))
    _bad(good[:20], r"bad.mpkg: truncated: 20 bytes")
    _bad(b"PK\x03\x04" + good[4:], "bad magic at byte 0")
    _bad(good[:8] + struct.pack("<I", 7) + good[12:], "format version 7 at byte 8")
    _bad(good[:-1], "truncated or padded")
    _bad(good + b"\0", "truncated or padded")
    _bad(good[:16] + struct.pack("<Q", 33) + good[24:], "not 64-byte aligned")
    _bad(good[:32] + b"}" + good[33:], "is not JSON")

    def drop_blob_end(h):
        h["arrays"][0][2] = 1 << 40
    _bad(_with_header(good, drop_blob_end), r"array 0: bytes .* past the blob's end")

    def wrong_size(h):
        h["arrays"][0][3] += 4
    _bad(_with_header(good, wrong_size), "array 0: .* do not hold")

    def bad_dtype(h):
        h["arrays"][1][0] = "object"
    _bad(_with_header(good, bad_dtype), "array 1: malformed entry")

    def unknown_op(h):
        h["networks"]["all"]["nodes"][2][0] = "__class__"
    _bad(_with_header(good, unknown_op), r"network 'all', node 2 \('__class__'\): .*unknown op kind")

    def dangling(h):
        h["networks"]["all"]["nodes"][1][2] = ["nowhere"]
    _bad(_with_header(good, dangling), r"node 1 \('pool2d'\): .*'nowhere'")

    def bad_attr(h):
        h["networks"]["all"]["nodes"][1][3]["mode"] = "median"
    _bad(_with_header(good, bad_attr), r"node 1 \('pool2d'\): ValidationError: pool2d: mode")

    def bad_ref(h):
        h["networks"]["all"]["nodes"][0][3]["weights"] = {"$array": 999}
    _bad(_with_header(good, bad_ref), "array reference 999 out of range")

    def bad_shape(h):
        h["networks"]["all"]["inputs"][0][1] = [1, 6, 7, 4]
    _bad(_with_header(good, bad_shape), r"node 0 \('conv2d'\): ValidationError: conv2d: the input has 4 channels")


def test_every_truncation_is_an_error(rng):
    """No prefix of a package loads or crashes."""
    net = ml.Network("t")
    net.output(net.gemm(net.input("x", (2, 3)), rng.standard_normal((2, 3))), "y")
    good = ml_package.package_bytes(net)
    for n in range(len(good)):
        with pytest.raises(ml_package.PackageError):
            ml_package.load_package_bytes(good[:n])


def test_missing_file(device, tmp_path):
    with pytest.raises(ml_package.PackageError, match="cannot read"):
        device.make_library(str(tmp_path / "none.mpkg"))
