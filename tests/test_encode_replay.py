"""A neuron or arithmetic kernel encoded again on the same persistent images replays the
commands it recorded last time (kernel.py, _Encoding._replay). Every change that could alter
what an encode records must be seen: kernel attributes, other images, images that died."""
import gc

import numpy as np
import pytest

import mpskernels as mk

F32 = mk.ImageFeatureChannelFormat.FLOAT32


def _image(device, array):
    return mk.Image.from_numpy(device, np.ascontiguousarray(array, dtype=np.float32))


def _empty(device, h, w, c):
    return mk.Image(device, mk.ImageDescriptor(F32, w, h, c))


def _encode(run, device, kernel, *images):
    run(device, lambda cb: kernel.encode(cb, *images))
    return images[-1].to_numpy()


def test_replay_gives_the_same_result_and_replays(device, run, rng):
    x = rng.standard_normal((1, 5, 7, 20)).astype(np.float32)
    src, dst = _image(device, x), _empty(device, 5, 7, 20)
    relu = mk.CNNNeuronReLU(device, a=0.0)
    _encode(run, device, relu, src, dst)
    recorded = relu._recorded[1]
    src.write_bytes(np.ascontiguousarray(-x))   # same storage, new contents
    np.testing.assert_array_equal(_encode(run, device, relu, src, dst), np.maximum(-x, 0))
    assert relu._recorded[1] is recorded   # replayed, not recorded again


@pytest.mark.parametrize("change", ["a", "offset", "clip_rect", "destination_feature_channel_offset",
                                    "source_feature_channel_offset", "edge_mode"])
def test_a_changed_attribute_is_seen(device, run, rng, change):
    x = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
    src, dst = _image(device, x), _empty(device, 6, 6, 8)
    k = mk.CNNNeuronReLU(device, a=0.5)
    _encode(run, device, k, src, dst)
    dst.write_bytes(np.zeros((1, 6, 6, 8), np.float32))
    want = np.where(x > 0, x, 0.5 * x)
    if change == "a":
        k.a = 0.25
        want = np.where(x > 0, x, 0.25 * x)
    elif change == "offset":
        k.offset = (1, 0, 0)
        want = np.zeros_like(x)
        want[:, :, :5] = np.where(x > 0, x, 0.5 * x)[:, :, 1:]   # edge mode ZERO: leaky(0) = 0
    elif change == "clip_rect":
        k.clip_rect = ((0, 0, 0), (3, 2, 1))
        full = want
        want = np.zeros_like(x)
        want[:, :2, :3] = full[:, :2, :3]
    elif change == "destination_feature_channel_offset":
        k.source_feature_channel_max_count = 4
        k.destination_feature_channel_offset = 4
        want = np.zeros_like(x)
        want[..., 4:] = np.where(x > 0, x, 0.5 * x)[..., :4]
    elif change == "source_feature_channel_offset":
        k.source_feature_channel_offset = 4
        want = np.zeros_like(x)
        want[..., :4] = np.where(x > 0, x, 0.5 * x)[..., 4:]
    elif change == "edge_mode":
        k.offset = (-1, 0, 0)
        _encode(run, device, k, src, dst)
        k.edge_mode = mk.ImageEdgeMode.CLAMP
        clamped = np.concatenate([x[:, :, :1], x[:, :, :5]], axis=2)
        want = np.where(clamped > 0, clamped, 0.5 * clamped)
    np.testing.assert_allclose(_encode(run, device, k, src, dst), want, rtol=1e-6)


def test_other_images_and_dead_images_are_not_replayed(device, run, rng):
    add = mk.CNNAdd(device)
    a, b = (rng.standard_normal((1, 4, 4, 3)).astype(np.float32) for _ in range(2))
    ia, ib, out = _image(device, a), _image(device, b), _empty(device, 4, 4, 3)
    np.testing.assert_allclose(_encode(run, device, add, ia, ib, out), a + b, rtol=1e-6)
    np.testing.assert_allclose(_encode(run, device, add, ib, ia, out), a + b, rtol=1e-6)
    add.bias = 1.0
    np.testing.assert_allclose(_encode(run, device, add, ia, ib, out), a + b + 1, rtol=1e-6)
    for _ in range(5):   # a new image may reuse a dead one's id: it must not be mistaken for it
        del ia, out
        gc.collect()
        c = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
        ia, out = _image(device, c), _empty(device, 4, 4, 3)
        np.testing.assert_allclose(_encode(run, device, add, ia, ib, out), c + b + 1, rtol=1e-6)


def test_temporaries_are_never_replayed(device, rng):
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    src, dst = _image(device, x), _empty(device, 4, 4, 4)
    relu = mk.CNNNeuronReLU(device, a=0.0)
    queue = device.make_command_queue()
    for _ in range(3):
        cb = queue.make_command_buffer()
        t = mk.TemporaryImage(cb, mk.ImageDescriptor(F32, 4, 4, 4))
        relu.encode(cb, src, t)
        assert relu._recorded is None
        relu.encode(cb, t, dst)
        cb.commit()
        cb.wait_until_completed()
        np.testing.assert_array_equal(dst.to_numpy(), np.maximum(x, 0))
