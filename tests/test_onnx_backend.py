"""The ONNX backend node test cases shipped in the onnx package, for every op the importer
supports, run through the pipeline (import -> .mpkg bytes -> load -> compile -> dispatch).

Selection: every case whose nodes are all ops the importer runs with a kernel
(mpskernels.onnx_import.KERNEL_OPS; ops it only folds at build time, such as Shape, Cast,
Gather and Concat of constants, have cases with run-time inputs). Weights: our pipeline compiles weights at build time, so a case's graph inputs in a
weight position (Conv W/B, Gemm B/C, MatMul B, BatchNormalization parameters, PRelu slope, and
the shape/axes/bounds inputs of Reshape, Squeeze, Unsqueeze, Clip, Dropout) are given as
initializers holding the case's data. A case in SKIPS must fail at build time with a
ValidationError (checked below); every other selected case must match the expected outputs
within the case's own tolerances (rtol 1e-3, atol 1e-7 unless it says otherwise)."""
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the ONNX backend cases need the onnx package (pip install onnx)")
from onnx import numpy_helper  # noqa: E402

import mpskernels as mk  # noqa: E402
from mpskernels import ml, ml_package, onnx_import  # noqa: E402

WEIGHTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2, 3, 4),
           "LayerNormalization": (1, 2), "PRelu": (1,), "Reshape": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
           "Clip": (1, 2), "Dropout": (1, 2), "Slice": (1, 2, 3, 4), "Split": (1,), "Pad": (1, 2, 3),
           "Resize": (1, 2, 3), "Gather": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,),
           "ReduceMin": (1,)}

INTEGER = "integer or boolean tensors: the pipeline's tensors are float32 (no integer kernels yet)"
POOL_2D = "1-D and 3-D pooling: the pool kernel is 2-D (NHWC) only"
INDICES = "MaxPool's Indices output is not supported"
BN_TRAINING = "BatchNormalization in training mode (running statistics outputs)"
MASK = "Dropout's mask output is not supported"
TRAINING_DROPOUT = "training-mode Dropout is random; models are imported for inference"
CONSTANT_OUTPUT = "the graph output is a constant: nothing to run"
NOT_TENSOR = "optional / sequence types: the pipeline binds tensors only"
PRELU = "PRelu slopes that vary along more than the channel dimension"
EMPTY = "tensors with a zero-sized dimension"
CONV_2D = "1-D and 3-D ConvTranspose: the convolution kernels are 2-D (NHWC) only"
CUBIC = "Resize mode cubic: nearest and linear are implemented"
ANTIALIAS = "Resize with antialias (a wider filter when downsampling) is not implemented"
CROP = "Resize coordinate mode tf_crop_and_resize (a region of interest) is not implemented"

SKIPS = {
    "test_add_int16": INTEGER,
    "test_add_int8": INTEGER,
    "test_add_uint16": INTEGER,
    "test_add_uint32": INTEGER,
    "test_add_uint64": INTEGER,
    "test_add_uint8": INTEGER,
    "test_averagepool_1d_default": POOL_2D,
    "test_averagepool_3d_default": POOL_2D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False": POOL_2D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True": POOL_2D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False": POOL_2D,
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True": POOL_2D,
    "test_averagepool_3d_dilations_small": POOL_2D,
    "test_batchnorm_epsilon_training_mode": BN_TRAINING,
    "test_batchnorm_example_training_mode": BN_TRAINING,
    "test_clip_default_int8_inbounds": INTEGER,
    "test_clip_default_int8_inbounds_expanded": INTEGER,
    "test_clip_default_int8_max": INTEGER,
    "test_clip_default_int8_min": INTEGER,
    "test_constant": CONSTANT_OUTPUT,
    "test_convtranspose_1d": CONV_2D,
    "test_convtranspose_3d": CONV_2D,
    "test_div_int16": INTEGER,
    "test_div_int32_trunc": INTEGER,
    "test_div_int8": INTEGER,
    "test_div_uint16": INTEGER,
    "test_div_uint32": INTEGER,
    "test_div_uint64": INTEGER,
    "test_div_uint8": INTEGER,
    "test_dropout_default_mask": MASK,
    "test_dropout_default_mask_ratio": MASK,
    "test_edge_pad": INTEGER,
    "test_identity_opt": NOT_TENSOR,
    "test_identity_sequence": NOT_TENSOR,
    "test_maxpool_1d_default": POOL_2D,
    "test_maxpool_2d_uint8": INTEGER,
    "test_maxpool_3d_default": POOL_2D,
    "test_maxpool_3d_dilations": POOL_2D,
    "test_maxpool_3d_dilations_use_ref_impl": POOL_2D,
    "test_maxpool_3d_dilations_use_ref_impl_large": POOL_2D,
    "test_maxpool_with_argmax_2d_precomputed_pads": INDICES,
    "test_maxpool_with_argmax_2d_precomputed_strides": INDICES,
    "test_mul_int16": INTEGER,
    "test_mul_int8": INTEGER,
    "test_mul_uint16": INTEGER,
    "test_mul_uint32": INTEGER,
    "test_mul_uint64": INTEGER,
    "test_mul_uint8": INTEGER,
    "test_prelu_broadcast": PRELU,
    "test_prelu_example": PRELU,
    "test_reduce_l1_empty_set_expanded": EMPTY,
    "test_reduce_log_sum_empty_set_expanded": EMPTY,
    "test_reduce_max_bool_inputs": INTEGER,
    "test_reduce_max_empty_set": EMPTY,
    "test_reduce_max_empty_set_bool": EMPTY,
    "test_reduce_min_bool_inputs": INTEGER,
    "test_reduce_min_empty_set": EMPTY,
    "test_reduce_sum_empty_set": EMPTY,
    "test_reduce_sum_empty_set_non_reduced_axis_zero": EMPTY,
    "test_reduce_sum_square_empty_set_expanded": EMPTY,
    "test_reflect_pad": INTEGER,
    "test_reshape_allowzero_reordered": EMPTY,
    "test_resize_downsample_scales_cubic": CUBIC,
    "test_resize_downsample_scales_cubic_A_n0p5_exclude_outside": CUBIC,
    "test_resize_downsample_scales_cubic_align_corners": CUBIC,
    "test_resize_downsample_scales_cubic_antialias": CUBIC,
    "test_resize_downsample_scales_linear_antialias": ANTIALIAS,
    "test_resize_downsample_sizes_cubic": CUBIC,
    "test_resize_downsample_sizes_cubic_antialias": CUBIC,
    "test_resize_downsample_sizes_linear_antialias": ANTIALIAS,
    "test_resize_tf_crop_and_resize": CROP,
    "test_resize_tf_crop_and_resize_axes_2_3": CROP,
    "test_resize_tf_crop_and_resize_axes_3_2": CROP,
    "test_resize_tf_crop_and_resize_extrapolation_value": CROP,
    "test_resize_upsample_scales_cubic": CUBIC,
    "test_resize_upsample_scales_cubic_A_n0p5_exclude_outside": CUBIC,
    "test_resize_upsample_scales_cubic_align_corners": CUBIC,
    "test_resize_upsample_scales_cubic_asymmetric": CUBIC,
    "test_resize_upsample_sizes_cubic": CUBIC,
    "test_slice_start_out_of_bounds": EMPTY,
    "test_split_zero_size_splits_opset13": EMPTY,
    "test_split_zero_size_splits_opset18": EMPTY,
    "test_sub_int16": INTEGER,
    "test_sub_int8": INTEGER,
    "test_sub_uint16": INTEGER,
    "test_sub_uint32": INTEGER,
    "test_sub_uint64": INTEGER,
    "test_sub_uint8": INTEGER,
    "test_training_dropout": TRAINING_DROPOUT,
    "test_training_dropout_default": TRAINING_DROPOUT,
    "test_training_dropout_default_mask": MASK,
    "test_training_dropout_mask": MASK,
    "test_training_dropout_zero_ratio_mask": MASK,
    "test_wrap_pad": INTEGER,
}


def _cases():
    from onnx.backend.test.case import node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases()
    return {c.name: c for c in cases
            if c.model is not None and c.model.graph.node
            and {n.op_type for n in c.model.graph.node} <= onnx_import.KERNEL_OPS}


CASES = _cases()


def _with_weights(model, inputs):
    """The model with weight-position graph inputs turned into initializers; the remaining
    run-time inputs {name: array}."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    feeds = {i.name: a for i, a in zip(graph.input, inputs)}
    weights = {n.input[k] for n in graph.node for k in WEIGHTS.get(n.op_type, ()) if k < len(n.input)}
    keep = [i for i in graph.input if i.name not in weights or i.name not in feeds]
    for name in weights & set(feeds):
        graph.initializer.append(numpy_helper.from_array(np.asarray(feeds.pop(name)), name))
    del graph.input[:]
    graph.input.extend(keep)
    return model, feeds


def _session(model):
    import tempfile, os
    fd, path = tempfile.mkstemp(suffix=".mpkg")
    os.close(fd)
    try:
        ml_package.build_package(model, path)
        return ml.Session(path, num_threads=2)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_case(name):
    case = CASES[name]
    for inputs, expected in case.data_sets:
        model, feeds = _with_weights(case.model, inputs)
        if name in SKIPS:   # refused when the package is built, with a ValidationError
            with pytest.raises(mk.ValidationError):
                ml_package.package_bytes(onnx_import.import_onnx(model))
            pytest.skip(SKIPS[name])
        got = _session(model).run(feeds)
        for out, want in zip(case.model.graph.output, expected):
            np.testing.assert_allclose(got[out.name], want, rtol=case.rtol, atol=case.atol,
                                       err_msg=f"{name}: output {out.name!r}")


def test_skips_are_selected_cases():
    assert set(SKIPS) <= set(CASES), sorted(set(SKIPS) - set(CASES))
