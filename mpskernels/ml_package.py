"""The .mpkg package: networks (mpskernels.ml.Network) in one file, loadable without onnx.

Layout (little-endian):
    offset 0   8 bytes   magic b"MPKG\\x00\\r\\n\\x1a"
           8   u32       format version (1)
          12   u32       header length H (bytes of UTF-8 JSON)
          16   u64       blob offset B (a multiple of 64, >= 32 + H)
          24   u64       blob length L (the file is exactly B + L bytes)
          32   H bytes   header JSON
           B   L bytes   the arrays, each at a 64-byte aligned offset inside the blob

Header: {"networks": {name: {"inputs": [[name, shape, data_type]], "constants": [[name, array]],
"nodes": [[kind, output name, [input names], attrs]], "outputs": [[node index, name]]}},
"arrays": [[dtype, shape, offset, nbytes]]}. attrs are JSON values where {"$array": i} is
arrays[i] and {"$neuron": [type, a, b, c, slopes array or null]} an NNNeuronDescriptor. Loading
replays the nodes through the Network methods, so every check the IR makes on a network built
in Python also runs on a file. A malformed file raises PackageError naming the file and where.
"""
import json
import struct

import numpy as np

from mpskernels.enums import TensorDataType
from mpskernels.errors import ValidationError
from mpskernels.ml import Network
from mpskernels.neuron import NNNeuronDescriptor

MAGIC = b"MPKG\x00\r\n\x1a"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQQ")
_ALIGN = 64
_DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")


class PackageError(ValidationError):
    """A .mpkg file that cannot be loaded: the message names the file and what is wrong where."""


def _align(n):
    return -(-n // _ALIGN) * _ALIGN


# ---- writing --------------------------------------------------------------------------------

def package_bytes(networks):
    """The .mpkg bytes of a Network or {name: Network}."""
    if isinstance(networks, Network):
        networks = {networks.name: networks}
    arrays, blob = [], bytearray()

    def array(a):
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _DTYPES:
            raise ValidationError(f"a package cannot store {a.dtype} arrays")
        offset = _align(len(blob))
        blob.extend(b"\0" * (offset - len(blob)))
        blob.extend(a.tobytes())
        arrays.append([a.dtype.name, list(a.shape), offset, a.nbytes])
        return {"$array": len(arrays) - 1}

    def encode(v):
        if isinstance(v, np.ndarray):
            return array(v)
        if isinstance(v, NNNeuronDescriptor):
            return {"$neuron": [int(v.neuron_type), v.a, v.b, v.c,
                                None if v.data is None else array(np.asarray(v.data, np.float32))]}
        if isinstance(v, (tuple, list)):
            return [encode(x) for x in v]
        if isinstance(v, dict):
            return {k: encode(x) for k, x in v.items()}
        if isinstance(v, (np.integer, np.floating, np.bool_)):
            return v.item()
        return v

    header = {"networks": {}, "arrays": arrays}
    for name, net in networks.items():
        index = {n.outputs[0]: i for i, n in enumerate(net.nodes)}
        header["networks"][name] = {
            "inputs": [[v.name, list(v.shape), int(v.data_type)] for v in net.inputs],
            "constants": [[v.name, array(v.data)] for v in net.constants],
            "nodes": [[n.kind, n.outputs[0].name, [v.name for v in n.inputs], encode(n.attrs)] for n in net.nodes],
            "outputs": [[index[v], v.name] for v in net.outputs],
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    base = _align(_PREAMBLE.size + len(text))
    out = bytearray(_PREAMBLE.pack(MAGIC, VERSION, len(text), base, len(blob)))
    out += text
    out += b"\0" * (base - len(out))
    out += blob
    return bytes(out)


def save_package(networks, path):
    with open(path, "wb") as f:
        f.write(package_bytes(networks))


# ---- reading --------------------------------------------------------------------------------

def load_package(path):
    """{name: Network} from a .mpkg file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PackageError(f"cannot read package {path}: {e.strerror}") from None
    return load_package_bytes(data, str(path))


def load_package_bytes(data, where="<bytes>"):
    def fail(what):
        raise PackageError(f"{where}: {what}")

    if len(data) < _PREAMBLE.size:
        fail(f"truncated: {len(data)} bytes, the preamble alone is {_PREAMBLE.size}")
    magic, version, hlen, base, blen = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        fail("not an mpskernels package (bad magic at byte 0)")
    if version != VERSION:
        fail(f"format version {version} at byte 8; this mpskernels reads version {VERSION}")
    if base % _ALIGN or base < _PREAMBLE.size + hlen:
        fail(f"blob offset {base} (byte 16) is not 64-byte aligned past the {hlen}-byte header")
    if base + blen != len(data):
        fail(f"truncated or padded: the preamble says {base + blen} bytes, the file has {len(data)}")
    try:
        header = json.loads(bytes(data[_PREAMBLE.size:_PREAMBLE.size + hlen]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        fail(f"the header (bytes {_PREAMBLE.size}..{_PREAMBLE.size + hlen}) is not JSON: {e}")
    blob = memoryview(data)[base:]
    if not isinstance(header, dict) or not isinstance(header.get("networks"), dict) \
            or not isinstance(header.get("arrays"), list):
        fail("the header lacks 'networks' or 'arrays'")
    arrays = [_array(blob, entry, i, fail) for i, entry in enumerate(header["arrays"])]

    def decode(v, what):
        if isinstance(v, list):
            return tuple(decode(x, what) for x in v)
        if isinstance(v, dict):
            if set(v) == {"$array"}:
                i = v["$array"]
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(arrays):
                    fail(f"{what}: array reference {i!r} out of range 0..{len(arrays) - 1}")
                return arrays[i]
            if set(v) == {"$neuron"}:
                t, a, b, c, slopes = decode(v["$neuron"], what)
                return NNNeuronDescriptor(t, a, b, c, slopes)
            return {k: decode(x, what) for k, x in v.items()}
        return v

    networks = {}
    for name, spec in header["networks"].items():
        at = ["inputs"]   # _network keeps it up to date, for the message
        try:
            networks[name] = _network(name, spec, decode, at)
        except PackageError:
            raise
        except (ValidationError, KeyError, TypeError, ValueError, IndexError, AttributeError,
                RecursionError) as e:
            fail(f"network {name!r}, {at[0]}: {type(e).__name__}: {e}")
    return networks


def _network(name, spec, decode, at):
    net = Network(name)
    values = {}
    for vname, shape, dtype in spec["inputs"]:
        values[vname] = net.input(str(vname), tuple(shape), TensorDataType(dtype))
    at[0] = "constants"
    for vname, ref in spec["constants"]:
        values[vname] = net.constant(decode(ref, "constants"), str(vname))
    nodes = []
    for i, (kind, nname, inputs, attrs) in enumerate(spec["nodes"]):
        at[0] = f"node {i} ({kind!r})"
        if kind not in Network.OPS:
            raise ValidationError(f"unknown op kind {kind!r}; this mpskernels knows {', '.join(Network.OPS)}")
        if not isinstance(attrs, dict):
            raise TypeError("attrs must be an object")
        missing = [v for v in inputs if v not in values]
        if missing:
            raise ValidationError(f"reads {missing}, which no earlier node, input or constant defines")
        out = getattr(net, kind)(*[values[v] for v in inputs], **decode(attrs, f"node {i}"), name=str(nname))
        values[out.name] = out
        nodes.append(out)
    at[0] = "outputs"
    for index, oname in spec["outputs"]:
        net.output(nodes[index], str(oname))
    return net


def _array(blob, entry, i, fail):
    try:
        dtype, shape, offset, nbytes = entry
        dtype = np.dtype(dtype) if dtype in _DTYPES else None
        shape = tuple(d for d in shape if isinstance(d, int) and not isinstance(d, bool) and d >= 0)
        ok = dtype is not None and len(shape) == len(entry[1]) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (offset, nbytes))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        fail(f"array {i}: malformed entry {entry!r} (want [dtype, shape, offset, nbytes])")
    if nbytes != int(np.prod(shape, dtype=object)) * dtype.itemsize or offset % _ALIGN:
        fail(f"array {i}: {nbytes} bytes at blob offset {offset} do not hold a {dtype} {shape} "
             f"(or the offset is not 64-byte aligned)")
    if offset + nbytes > len(blob):
        fail(f"array {i}: bytes {offset}..{offset + nbytes} lie past the blob's end ({len(blob)} bytes): truncated?")
    return np.frombuffer(blob, dtype, int(np.prod(shape, dtype=object)), offset).reshape(shape)


# ---- ONNX (optional) ------------------------------------------------------------------------

def build_package(onnx_path, out_path):
    """Import an ONNX model (needs onnx) and write it as a .mpkg; returns the Network."""
    from mpskernels.onnx_import import import_onnx
    net = import_onnx(onnx_path)
    save_package(net, out_path)
    return net


def load_networks(path):
    """{name: Network} from a .mpkg file, or from an .onnx model (packaged in memory, so it
    goes through exactly what a package file would)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PackageError(f"cannot read {path}: {e.strerror}") from None
    if data[:len(MAGIC)] == MAGIC:
        return load_package_bytes(data, str(path))
    from mpskernels.onnx_import import import_onnx
    return load_package_bytes(package_bytes(import_onnx(path)), f"{path} (imported from ONNX)")
