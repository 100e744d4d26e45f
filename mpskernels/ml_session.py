"""mpskernels.ml.Session: ONNX Runtime's shape of API over a pipeline, for people embedding a
model: Session(path).run({name: array}) -> {name: array}."""
import numpy as np

from mpskernels.device import Device
from mpskernels.enums import TensorDataType
from mpskernels.errors import ValidationError
from mpskernels.heap import HeapDescriptor
from mpskernels.ml import (ArgumentTableDescriptor, Library, LibraryFunctionDescriptor,
                           MachineLearningPipelineDescriptor, Network)
from mpskernels.tensor import Tensor, TensorExtents, _TYPES


class NodeArg:
    """An input or output of a session: name, shape (None for a free dimension), type."""

    def __init__(self, name, shape, data_type):
        self.name = name
        self.shape = None if shape is None else [None if d == -1 else d for d in shape]
        self.data_type = data_type
        self.type = f"tensor({np.dtype(_TYPES[data_type][0]).name})"

    def __repr__(self):
        return f"NodeArg(name={self.name!r}, type={self.type!r}, shape={self.shape})"


class Session:
    """An .mpkg or .onnx model (a path), or a Library or Network; run(inputs) compiles a
    pipeline per set of input shapes (cached), binds the arrays and runs one machine-learning
    pass."""

    def __init__(self, model, num_threads=None, device=None, function_name=None):
        self.device = device or Device(num_threads=num_threads)
        if isinstance(model, Network):
            model = Library(self.device, model)
        self.library = model if isinstance(model, Library) else self.device.make_library(model)
        names = self.library.function_names
        self.function_name = function_name or names[0]
        if self.function_name not in names:
            raise ValidationError(f"{model} has no function {self.function_name!r}; it has {names}")
        self.network = self.library._networks[self.function_name]
        self._queue = self.device.make_command_queue()
        self._compiled = {}
        self._views = {}    # per compiled shapes: the output tensors as NumPy views (None: converted)
        self._inputs = {}   # binding index -> (array, its layout, its tensor) of the last run
        self._recorded = {}  # per compiled shapes: (recording, the inputs' layouts) for _rerun

    def get_inputs(self):
        return [NodeArg(v.name, v.shape, v.data_type) for v in self.network.inputs]

    def get_outputs(self):
        return [NodeArg(v.name, v.shape, v.data_type) for v in self.network.outputs]

    def compile(self, shapes):
        """The pipeline, heap, argument table and output tensors for these input shapes."""
        key = tuple(tuple(s) for s in shapes)
        if key not in self._compiled:
            d = MachineLearningPipelineDescriptor(LibraryFunctionDescriptor(self.function_name, self.library))
            for i, shape in enumerate(shapes):
                d.set_input_dimensions(TensorExtents.from_shape(shape), i)
            state = self.device.make_compiler().make_machine_learning_pipeline_state(d)
            heap = self.device.make_heap(HeapDescriptor(size=max(state.intermediates_heap_size, 64)))
            table = self.device.make_argument_table(ArgumentTableDescriptor(
                max_buffer_bind_count=max(31, len(state.reflection.bindings))))
            outputs = []
            for b in state.reflection.bindings[len(shapes):]:
                t = Tensor.from_numpy(self.device, np.empty(b.dimensions.shape, _TYPES[b.data_type][0]))
                table.set_tensor(t, b.index)
                outputs.append(t)
            self._compiled[key] = (state, heap, table, outputs)
            self._views[key] = [None if t.data_type == TensorDataType.BFLOAT16 else t.to_numpy() for t in outputs]
        return self._compiled[key]

    def _bind(self, table, index, array):
        """Bind the array's tensor. A tensor sharing the array's memory is kept and bound
        again while the same array object comes back with the same memory and layout
        (repeated runs on one input buffer skip making a tensor: ~60 us of Python)."""
        layout = (array.shape, array.strides, array.dtype, array.ctypes.data)
        last = self._inputs.pop(index, None)
        if last is None or last[0] is not array or last[1] != layout:
            last = (array, layout, Tensor.from_numpy(self.device, array))
        if last[2]._address() == layout[3]:   # not a copy: in-place changes reach it
            self._inputs[index] = last
        table.set_tensor(last[2], index)

    def _check(self, inputs):
        if not isinstance(inputs, dict):
            raise TypeError(f"run takes a dict {{input name: array}}, got {type(inputs).__name__}")
        expected = [v.name for v in self.network.inputs]
        for name in inputs:
            if name not in expected:
                raise ValidationError(f"unknown input {name!r}; the model's inputs are {expected}")
        arrays = []
        for v in self.network.inputs:
            if v.name not in inputs:
                raise ValidationError(f"input {v.name!r} is missing; the model's inputs are {expected}")
            a = inputs[v.name]
            if not isinstance(a, np.ndarray):
                raise TypeError(f"input {v.name!r} must be a NumPy array, got {type(a).__name__}")
            want = _TYPES[v.data_type][0] if v.data_type != TensorDataType.BFLOAT16 else np.float32
            if a.dtype != want:
                raise ValidationError(f"input {v.name!r} has dtype {a.dtype}; the model takes {np.dtype(want)}")
            if a.ndim != len(v.shape) or any(m != -1 and m != g for m, g in zip(v.shape, a.shape)):
                raise ValidationError(f"input {v.name!r} has shape {a.shape}; the model takes "
                                      f"{tuple(None if d == -1 else d for d in v.shape)} (None: any)")
            arrays.append(a)
        return arrays

    @staticmethod
    def _layout(array):
        return array.shape, array.strides, array.dtype

    def _rerun(self, key, state, arrays):
        """Run the pipeline's recorded dispatch again, its inputs re-pointed at these arrays,
        without encoding a pass: what a pass would check still holds (the same pipeline, heap
        and output tensors; inputs laid out as those the recording read, each array's own
        memory: bound without a copy). Encoding costs about 0.25 ms of Python per run, run
        cold after the kernels (4% of MobileNetV2 on two threads). False if it cannot."""
        recording, layouts = self._recorded.get(key, (None, None))
        if recording is None or recording is not state._recording:
            return False
        spans = list(recording.spans)
        for i, a in enumerate(arrays):
            if self._layout(a) != layouts[i] or not a.flags.writeable:
                return False
            start = a.__array_interface__["data"][0]
            spans[1 + i] = (start, start + spans[1 + i][1] - spans[1 + i][0])
        if not recording.disjoint(spans):
            return False
        cb = self._queue.make_command_buffer()
        if not recording.replay_regions(cb, spans):
            return False
        cb.commit()
        cb.wait_until_completed()
        return True

    def run(self, inputs, output_names=None):
        """{output name: array} for {input name: array}."""
        arrays = self._check(inputs)
        shapes = tuple(a.shape for a in arrays)
        state, heap, table, outputs = self.compile(shapes)
        if not self._rerun(shapes, state, arrays):
            for i, a in enumerate(arrays):
                self._bind(table, i, a)
            cb = self._queue.make_command_buffer()
            enc = cb.make_machine_learning_command_encoder()
            enc.set_pipeline_state(state)
            enc.set_argument_table(table)
            enc.dispatch_network(heap)
            enc.end_encoding()
            cb.commit()
            cb.wait_until_completed()
            recording = state._recording
            zero_copy = all(i in self._inputs for i in range(len(arrays)))
            if recording is not None and zero_copy and recording.users[0]() is cb:
                self._recorded[shapes] = (recording, [self._layout(a) for a in arrays])
        result = {v.name: (t.to_numpy() if view is None else view).copy()
                  for v, t, view in zip(self.network.outputs, outputs, self._views[shapes])}
        if output_names is not None:
            missing = [n for n in output_names if n not in result]
            if missing:
                raise ValidationError(f"unknown outputs {missing}; the model's outputs are {list(result)}")
            result = {n: result[n] for n in output_names}
        return result
