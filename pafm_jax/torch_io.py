"""Reads PyTorch `.pt`/`.pth` files into numpy without torch, and without running their code.

A torch checkpoint is a pickle, and a pickle can call any importable function while it loads.
`load` therefore unpickles with an allow-list: the only globals a file may name are the few
that rebuild tensors, `collections.OrderedDict` and `argparse.Namespace`, and each of those
is answered by this module's own inert stand-in, never by the named object. Anything else is
refused with `UnsafePickleError` naming the global, before it can be called.

Both formats of `torch.save` are read:

* zip (torch >= 1.6, the default): `<any folder>/data.pkl` plus one record
  `<folder>/data/<key>` of raw little-endian bytes per storage;
* legacy (`_use_new_zipfile_serialization=False`): four pickles in one stream (magic
  number, protocol version, system info, the object), then the list of storage keys, then for
  each key an int64 element count and the raw bytes.

Tensors come back as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`); with `lazy=True` as
`TensorRef`s, whose bytes are read only when `np.asarray(ref)` is called, so a caller can look
at the names and shapes of a 10 GB training checkpoint and read only the part it needs.

Shared with the evaluation code (Inception weights) and `pafm_jax.convert` (SiT checkpoints).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import types
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

# The first pickle of a legacy file is this integer (torch.serialization.MAGIC_NUMBER).
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype of its elements.
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64),
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
}


class UnsafePickleError(pickle.UnpicklingError):
  """The file names a global outside the allow-list; nothing it names was imported or run."""


class TorchFileError(ValueError):
  """The file is not a torch checkpoint this reader understands, or it is damaged."""


def _refuse_state(obj, state):
  del state
  raise UnsafePickleError(f'the file tries to set the state of {type(obj).__name__}; '
                          'checkpoints written by torch.save never do.')


class _SealedClass(type):
  """A class whose attributes a pickle cannot change (BUILD on the class object itself);
  its instances are not affected."""
  __setstate__ = _refuse_state

  def __setattr__(cls, name, value):
    raise UnsafePickleError(f'the file tries to set attribute {name!r} of class '
                            f'{cls.__name__}; checkpoints written by torch.save never do.')


class PickledNamespace(types.SimpleNamespace, metaclass=_SealedClass):
  """What an `argparse.Namespace` (the `args` of SiT/REPA training checkpoints) loads as.

  Allowing it is safe: unpickling can only create an empty bag of this class (not argparse's)
  and fill its `__dict__` with values, which are themselves checked against the allow-list.
  No method of it runs, and the class itself cannot be altered.
  """


class _Sealed:
  """Base of the reader's own objects: pickle's BUILD opcode (set state) is refused on them,
  so a file cannot, e.g., enlarge a tensor's shape after its bounds were checked."""
  __slots__ = ()
  __setstate__ = _refuse_state


class _Callable(_Sealed):
  """An allow-listed global as the unpickler sees it: calls `fn`, holds no mutable state."""
  __slots__ = ('_fn',)

  def __init__(self, fn: Callable):
    self._fn = fn

  def __call__(self, *args, **kwargs):
    return self._fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Storages and tensors


class _StorageType(_Sealed):
  """Stands in for `torch.FloatStorage` etc.: only names the element dtype."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]

  def __call__(self, *args, **kwargs):
    raise UnsafePickleError(f'the file tries to construct torch.{self.name} directly; '
                            'checkpoints written by torch.save never do.')


class _Storage(_Sealed):
  """One flat storage of `numel` elements from `offset`, read on demand by `read(key, span)`."""
  __slots__ = ('dtype', 'key', 'numel', '_read', 'offset')

  def __init__(self, dtype: np.dtype, key: str, numel: int,
               read: Callable[[str, tuple[int, int]], bytes], offset: int = 0):
    self.dtype, self.key, self.numel, self._read, self.offset = dtype, key, numel, read, offset

  def array(self) -> np.ndarray:
    """The storage's elements, [numel]."""
    nbytes = self.numel * self.dtype.itemsize
    raw = self._read(self.key, (self.offset * self.dtype.itemsize, nbytes))
    if len(raw) != nbytes:
      raise TorchFileError(f'storage {self.key!r} holds {len(raw)} bytes, expected {nbytes} '
                           f'({self.numel} × {self.dtype}); the file is truncated or damaged.')
    return np.frombuffer(raw, self.dtype)


class TensorRef(_Sealed):
  """A tensor not read yet: `shape`, `dtype`, and `np.asarray(ref)` to read it."""
  __slots__ = ('storage', 'offset', 'shape', 'stride', 'dtype')

  def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
    self.dtype = storage.dtype

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def numpy(self) -> np.ndarray:
    """A fresh, contiguous, writable array of `shape`."""
    if self.size == 0:
      return np.zeros(self.shape, self.dtype)
    flat = self.storage.array()
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.shape, tuple(s * self.dtype.itemsize for s in self.stride),
        writeable=False)
    return np.array(view, copy=True, order='C')

  def __array__(self, dtype=None, copy=None):
    out = self.numpy()
    return out if dtype is None else out.astype(dtype)

  def __repr__(self) -> str:
    return f'TensorRef(shape={self.shape}, dtype={self.dtype})'


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise TorchFileError(f'tensor {what} must be a tuple of ints, got {value!r}.')
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> TensorRef:
  """Our answer to `torch._utils._rebuild_tensor(_v2)`: a bounds-checked view description.

  The remaining arguments (requires_grad, backward hooks, metadata) do not change the values.
  """
  del unused
  if not isinstance(storage, _Storage):
    raise TorchFileError('a tensor refers to something that is not a storage of this file.')
  shape, stride = _int_tuple(size, 'size'), _int_tuple(stride, 'stride')
  if len(shape) != len(stride) or not isinstance(storage_offset, int):
    raise TorchFileError(f'malformed tensor: size {shape}, stride {stride}, offset '
                         f'{storage_offset!r}.')
  if min(shape + stride + (storage_offset,), default=0) < 0:
    raise TorchFileError(f'negative size, stride or offset in tensor {shape}/{stride}.')
  # The last element the view touches must lie inside the storage, or as_strided would read
  # memory that is not ours.
  if 0 not in shape:
    last = storage_offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= storage.numel:
      raise TorchFileError(f'tensor of size {shape} and stride {stride} at offset '
                           f'{storage_offset} reaches past its storage of {storage.numel} '
                           'elements; the file is damaged.')
  return TensorRef(storage, storage_offset, shape, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None) -> TensorRef:
  """`torch._utils._rebuild_parameter(_with_state)`: a Parameter is its data."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, TensorRef):
    raise TorchFileError('a Parameter wraps something that is not a tensor.')
  return data


# (module, name) the file may name -> what this reader hands the unpickler instead. None of
# these is the named object itself, and none can be modified by the file.
_ALLOWED: dict[tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor_v2'): _Callable(_rebuild_tensor),
    ('torch._utils', '_rebuild_tensor'): _Callable(_rebuild_tensor),
    ('torch._utils', '_rebuild_parameter'): _Callable(_rebuild_parameter),
    ('torch._utils', '_rebuild_parameter_with_state'): _Callable(_rebuild_parameter),
    ('collections', 'OrderedDict'): _Callable(collections.OrderedDict),
    # A class, because pickle creates it with NEWOBJ (cls.__new__(cls)); sealed, see above.
    ('argparse', 'Namespace'): PickledNamespace,
    **{('torch', name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals through `_ALLOWED` only; storages through `storage_for`."""

  def __init__(self, file, storage_for: Callable[[tuple], _Storage]):
    super().__init__(file)
    self._storage_for = storage_for

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'refusing to load global {module}.{name}: a checkpoint may only contain tensors, '
          'plain Python values, OrderedDict and argparse.Namespace. If this file is trusted, '
          'load it with torch and re-save the parts you need (e.g. '
          "torch.save(ckpt['ema'], 'ema.pt')).") from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
      raise TorchFileError(f'unsupported persistent id {pid!r}; expected a torch storage.')
    if not isinstance(pid[1], _StorageType):
      raise TorchFileError(f'storage of unknown type {pid[1]!r}.')
    return self._storage_for(pid)


# --------------------------------------------------------------------------------------------
# The two file formats


def _check_numel(pid: tuple) -> tuple[str, int]:
  key, numel = pid[2], pid[4]
  if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
    raise TorchFileError(f'malformed storage id {pid!r}.')
  return key, numel


def _load_zip(path: str) -> Any:
  """Unpickles `<folder>/data.pkl`; storages read `<folder>/data/<key>` when asked."""
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.count('/') == 1 and n.endswith('/data.pkl')]
    if len(pkls) != 1:
      hint = (' It looks like a TorchScript archive (torch.jit.save): save the module\'s '
              'state_dict() with torch.save instead.' if any(
                  n.endswith('constants.pkl') for n in names) else '')
      raise TorchFileError(f'{path}: a torch zip checkpoint has exactly one <folder>/data.pkl, '
                           f'found {pkls}.{hint}')
    prefix = pkls[0][:-len('data.pkl')]
    byteorder = (zf.read(prefix + 'byteorder').decode().strip()
                 if prefix + 'byteorder' in names else 'little')
    if byteorder != 'little':
      raise TorchFileError(f'{path} was written on a {byteorder}-endian machine; only '
                           'little-endian checkpoints are supported.')
    pickled = zf.read(pkls[0])

  def read(key: str, span: tuple[int, int]) -> bytes:
    start, nbytes = span
    # Re-opened per read so that lazy TensorRefs outlive this call; zip records of torch are
    # stored uncompressed, so the seek is cheap.
    with zipfile.ZipFile(path) as zf:
      try:
        record = zf.open(f'{prefix}data/{key}')
      except KeyError:
        raise TorchFileError(f'{path} has no record for storage {key!r}; the file is '
                             'damaged.') from None
      with record:
        record.seek(start)
        return record.read(nbytes)

  def storage_for(pid: tuple) -> _Storage:
    key, numel = _check_numel(pid)
    return _Storage(pid[1].dtype, key, numel, read)

  return _RestrictedUnpickler(io.BytesIO(pickled), storage_for).load()


def _load_legacy(path: str) -> Any:
  """The pre-1.6 single-stream format; storage byte offsets are found after the pickle."""
  storages: dict[str, list[_Storage]] = {}
  offsets: dict[str, int] = {}

  def read(key: str, span: tuple[int, int]) -> bytes:
    start, nbytes = span
    with open(path, 'rb') as f:
      f.seek(offsets[key] + start)
      return f.read(nbytes)

  def storage_for(pid: tuple) -> _Storage:
    key, numel = _check_numel(pid)
    dtype = pid[1].dtype
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # (view_key, element offset, view size) of very old files
      if not (isinstance(view, tuple) and len(view) == 3 and all(
          isinstance(v, int) and v >= 0 for v in view[1:])):
        raise TorchFileError(f'malformed storage view {view!r}.')
      storage = _Storage(dtype, key, view[2], read, offset=view[1])
    else:
      storage = _Storage(dtype, key, numel, read)
    if storages.get(key) and storages[key][0].dtype != dtype:
      raise TorchFileError(f'storage {key!r} is used with two element types.')
    storages.setdefault(key, []).append(storage)
    return storage

  with open(path, 'rb') as f:
    try:
      magic = _RestrictedUnpickler(f, storage_for).load()
    except UnsafePickleError:
      raise
    except Exception:  # any bytes at all can land here: say what the file is not
      magic = None
    if magic != LEGACY_MAGIC:
      raise TorchFileError(f'{path} is neither a torch zip checkpoint nor a legacy torch file '
                           '(bad magic number). Very old tar-format files are not supported: '
                           're-save them with a current torch.')
    protocol = _RestrictedUnpickler(f, storage_for).load()
    sys_info = _RestrictedUnpickler(f, storage_for).load()
    if protocol != LEGACY_PROTOCOL:
      raise TorchFileError(f'{path}: unsupported legacy protocol version {protocol!r}.')
    if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
      raise TorchFileError(f'{path} was written on a big-endian machine; unsupported.')
    obj = _RestrictedUnpickler(f, storage_for).load()
    keys = _RestrictedUnpickler(f, storage_for).load()
    if not isinstance(keys, list):
      raise TorchFileError(f'{path}: malformed storage key list.')
    # Each record: int64 element count, then the raw elements. Their size is known from the
    # storage type the pickle gave the key.
    pos = f.tell()
    size = os.fstat(f.fileno()).st_size
    for key in keys:
      if key not in storages:
        raise TorchFileError(f'{path}: storage {key!r} is listed but never used.')
      f.seek(pos)
      head = f.read(8)
      if len(head) != 8:
        raise TorchFileError(f'{path} is truncated (storage {key!r}).')
      (numel,) = struct.unpack('<q', head)
      for storage in storages[key]:
        if numel < 0 or storage.offset + storage.numel > numel:
          raise TorchFileError(f'{path}: storage {key!r} has {numel} elements on disk, but '
                               f'the pickle uses {storage.offset + storage.numel}.')
      offsets[key] = pos + 8
      pos += 8 + numel * storages[key][0].dtype.itemsize
      if pos > size:
        raise TorchFileError(f'{path} is truncated (storage {key!r}).')
    missing = set(storages) - set(offsets)
    if missing:
      raise TorchFileError(f'{path}: storages {sorted(missing)} have no data.')
  return obj


# --------------------------------------------------------------------------------------------
# Public API


def materialize(obj: Any) -> Any:
  """Replaces every TensorRef in nested dicts/lists/tuples/namespaces by its numpy array."""
  if isinstance(obj, TensorRef):
    return obj.numpy()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, materialize(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: materialize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(materialize(v) for v in obj)
  if isinstance(obj, PickledNamespace):
    return PickledNamespace(**{k: materialize(v) for k, v in vars(obj).items()})
  return obj


def load(path: str | os.PathLike, *, lazy: bool = False) -> Any:
  """Loads a torch checkpoint without torch: tensors as numpy arrays (or TensorRefs if lazy).

  Raises UnsafePickleError if the file names any global outside the allow-list (nothing it
  names is imported or called), TorchFileError if it is not a readable torch checkpoint.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such checkpoint file: {path}')
  if zipfile.is_zipfile(path):
    obj = _load_zip(path)
  else:
    obj = _load_legacy(path)
  return obj if lazy else materialize(obj)
