"""pyangbind without a new Python class per object.

pyangbind 0.8.7's YANGDynClass defines a class per call (every leaf, container and
every set), RestrictedClassType another one per call, and a restricted value's
__new__ recompiles its patterns and deep-copies its enumeration on every instance:
decoding one list entry cost 10-15 ms, and the classes fed the cyclic GC. Here the
classes are built once per shape (cached by everything that shapes them) and what
varies per object (parent, yang_name, paths, default...) lives in the instance, as
pyangbind already stores it there. Values, checks, errors and serialisations are
unchanged; tests/test_fastbind.py compares both builds on the sample nodes.

install() must run before a bindings module is imported (they bind YANGDynClass
by name): sdqkd/__init__.py does it when sdqkd.bindings is first imported.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import threading
import uuid
from decimal import Decimal
from types import ModuleType
from typing import Any

import regex
from pyangbind.lib import yangtypes

ORIGINAL = {
    "YANGDynClass": yangtypes.YANGDynClass,
    "RestrictedClassType": yangtypes.RestrictedClassType,
    "RestrictedPrecisionDecimalType": yangtypes.RestrictedPrecisionDecimalType,
    "TypedListType": yangtypes.TypedListType,
    "YANGListType": yangtypes.YANGListType,
}

_lock = threading.Lock()
_restricted: dict[Any, type] = {}
_decimals: dict[Any, type] = {}
_typed_lists: dict[Any, type] = {}
_dyn: dict[tuple[type, bool], type] = {}
_shared: set[type] = set()  # classes made once per shape here: safe as a cache key
_SIMPLE = (str, int, bool, Decimal, bytes, list, dict, yangtypes.YANGBool, yangtypes.YANGBinary)


class _Uncacheable(Exception):
    pass


def _freeze(v: Any) -> Any:
    """A hashable stand-in for a factory argument (the generated code passes literals
    and classes); anything else is not cached."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return (type(v), v)
    if isinstance(v, dict):
        return ("d",) + tuple((k, _freeze(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ("l" if isinstance(v, list) else "t",) + tuple(_freeze(x) for x in v)
    if isinstance(v, type) and (v in _shared or v in _SIMPLE):
        return ("c", v)
    raise _Uncacheable


def _cached(table: dict[Any, type], name: str, args: tuple, kwargs: dict, prepare: Any = None) -> type:
    try:
        key = (_freeze(args), _freeze(kwargs))
    except _Uncacheable:
        return ORIGINAL[name](*args, **kwargs)
    cls = table.get(key)
    if cls is None:
        with _lock:
            cls = table.get(key)
            if cls is None:
                cls = ORIGINAL[name](*args, **kwargs)
                if prepare is not None:
                    prepare(cls)
                _shared.add(cls)
                table[key] = cls
    return cls


def _restricted_new(cls: type) -> None:
    """Replace RestrictedClass.__new__ (which rebuilds its tests on every call, on the
    class itself: racy once the class is shared) by one using the tests its first
    instance built. The checks and errors are pyangbind's, in the same order."""
    base_type = cls.__bases__[0]
    tests = list(cls._restriction_tests)
    has_range = "range" in cls._restriction_dict

    def __new__(self: type, *args: Any, **kwargs: Any) -> Any:
        val = args[0] if args else False
        if has_range and val:
            try:
                val = base_type(val)
            except Exception:
                raise TypeError("must specify a numeric type for a range " + "argument")
        if val is not False:
            if not tests:
                raise UnboundLocalError("cannot access local variable 'passed' where it is not associated with a value")
            passed = False
            for test in tests:
                if test(val) is not False:
                    passed = True
                    break
            if not passed:
                raise ValueError("%s does not match a restricted type" % val)
        try:
            return base_type.__new__(self, *args, **kwargs)
        except TypeError:
            return base_type.__new__(self)

    cls.__new__ = __new__  # type: ignore[assignment]
    # pyangbind's nested restrictions leave the innermost one's tables on the class
    # (its __new__ writes them on the class being made): keep that view.
    if hasattr(base_type, "_restriction_tests"):
        for attr in ("_restriction_dict", "_restriction_tests", "_enumeration_dict"):
            if attr in base_type.__dict__ or hasattr(base_type, attr):
                setattr(cls, attr, getattr(base_type, attr))


def RestrictedClassType(*args: Any, **kwargs: Any) -> type:
    return _cached(_restricted, "RestrictedClassType", args, kwargs, _restricted_new)


def RestrictedPrecisionDecimalType(*args: Any, **kwargs: Any) -> type:
    return _cached(_decimals, "RestrictedPrecisionDecimalType", args, kwargs)


def TypedListType(*args: Any, **kwargs: Any) -> type:
    return _cached(_typed_lists, "TypedListType", args, kwargs)


_key_names: dict[tuple[type, str], Any] = {}


def _key_yang_name(contained: type, kv: str, parent: Any, yang_name: Any) -> Any:
    """The YANG name of key leaf `kv`: pyangbind builds a whole throw-away entry for
    it on every add; it depends on the entry class only."""
    name = _key_names.get((contained, kv))
    if name is None:
        tmp = yangtypes.YANGDynClass(base=contained, parent=parent, yang_name=yang_name,
                                     is_container="container", path_helper=False)
        name = _key_names[(contained, kv)] = getattr(tmp, kv).yang_name()
    return name


def _list_set(env: dict[str, Any]) -> Any:
    """pyangbind's YANGList.__set without the throw-away entry (same checks, errors, paths)."""
    parent, yang_name, is_container = env["parent"], env["yang_name"], env["is_container"]
    path_helper, extensions = env["path_helper"], env["extensions"]

    def __set(self: Any, *args: Any, **kwargs: Any) -> Any:
        k = kwargs.pop("_k", None)
        v = kwargs.pop("_v", None)
        named_set = kwargs.pop("_named_set", False)

        if k is None and self._keyval and not named_set:
            k = args[0]
        elif k is None:
            k = str(uuid.uuid1())

        update = False
        if v is not None:
            if not self.__check__(v):
                raise ValueError("value must be set to an instance of %s" % (self._contained_class))
            update = True

        if k in self._members:
            update = True

        if self._keyval:
            try:
                keydict = None
                if " " in self._keyval and not named_set:
                    keys = self._keyval.split(" ")
                    keyparts = k.split(" ")
                    keydict = {}
                    for kp, kv in zip(keys, keyparts):
                        keydict[kp] = kv
                    if not len(keyparts) == len(keys):
                        raise KeyError("YANGList key must contain all key elements (%s)" % (self._keyval.split(" ")))
                elif named_set:
                    k = kwargs.pop("_python_key", None)
                    keydict = copy.copy(kwargs)
                else:
                    if k == "":
                        raise KeyError("Cannot set a null key for a list entry!")
                    keydict = {self._keyval: k}

                if keydict is not None:
                    keys = self._keyval.split(" ")
                    path_keystring = "["
                    for kv in keys:
                        path_keystring += "%s='%s' " % (_key_yang_name(self._contained_class, kv, parent, yang_name), keydict[kv])
                    path_keystring = path_keystring[:-1]
                    path_keystring += "]"

                if not update:
                    tmp = yangtypes.YANGDynClass(
                        base=self._contained_class, parent=parent, yang_name=yang_name, is_container="container",
                        path_helper=path_helper, register_path=(self._parent._path() + [self._yang_name + path_keystring]),
                        extmethods=self._parent._extmethods, extensions=extensions,
                    )
                else:
                    tmp = yangtypes.YANGDynClass(
                        v, base=self._contained_class, parent=parent, yang_name=yang_name, is_container="container",
                        path_helper=path_helper, register_path=(self._parent._path() + [self._yang_name + path_keystring]),
                        extmethods=self._parent._extmethods, load=True, extensions=extensions,
                    )

                if keydict is not None:
                    for kn in keydict:
                        key = getattr(tmp, "_set_%s" % yangtypes.safe_name(kn))
                        key(keydict[kn], load=True)

                if hasattr(k, "_referenced_object") and k._referenced_object is not None:
                    k = k._referenced_object

                self._members[k] = tmp

            except ValueError as m:
                raise KeyError("key value %s must be valid, %s" % (self._keyval, m))
        else:
            self._members[k] = yangtypes.YANGDynClass(
                base=self._contained_class, parent=parent, yang_name=yang_name, is_container=is_container,
                path_helper=path_helper, extmethods=self._parent._extmethods, extensions=extensions,
            )
            return k

    return __set


def YANGListType(*args: Any, **kwargs: Any) -> type:
    """pyangbind's YANGList class (one per list instance: it closes over its parent)
    with the add path above."""
    cls = ORIGINAL["YANGListType"](*args, **kwargs)
    fn = cls._YANGList__set
    if set(fn.__code__.co_freevars) == {"extensions", "is_container", "parent", "path_helper", "yang_name"}:
        env = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
        cls._YANGList__set = _list_set(env)
    return cls


_SLOTS = (
    "_default", "_mchanged", "_yang_name", "_choice", "_parent", "_supplied_register_path",
    "_path_helper", "_base_type", "_is_leaf", "_is_container", "_extensionsd", "_extmethods",
    "_is_keyval", "_register_paths", "_namespace", "_yang_type", "_defining_module",
    "_metadata", "_is_config", "_cpresent", "_presence",
)


def _cacheable_base(base_type: type) -> bool:
    """A base made once (builtin, cached here, or a bindings module's top-level class);
    YANGListType, ReferenceType and YANGBitsType classes close over their parent."""
    if base_type in _shared or base_type in _SIMPLE:
        return True
    mod = sys.modules.get(getattr(base_type, "__module__", ""))
    return (mod is not None and getattr(mod, base_type.__name__, None) is base_type
            and hasattr(base_type, "_pyangbind_elements"))


def _dyn_class(base_type: type, slotted: bool) -> type:
    """pyangbind's YANGBaseClass with the per-object values read from the instance."""

    class YANGBaseClass(base_type):  # type: ignore[misc, valid-type]
        if slotted:
            __slots__ = _SLOTS

        _pybind_base_class = regex.sub("<(type|class) '(?P<class>.*)'>", r"\g<class>", str(base_type))

        def __new__(self, *args: Any, **kwargs: Any) -> Any:
            try:
                obj = base_type.__new__(self, *args, **kwargs)
            except TypeError:
                obj = base_type.__new__(self)
            return obj

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Only reached when the class is called directly (YANGDynClass calls _fb_init):
            # the object gets YANGDynClass's defaults.
            self._fb_init(args, kwargs, None, False, False, False, False, False, None, None, None,
                          None, False, True, None, None, None, True, None, None)

        def _fb_init(self, args: tuple, kwargs: dict, extmethods: Any, default: Any, yang_name: Any, parent_instance: Any,
                     choice_member: Any, is_container: Any, is_leaf: Any, path_helper: Any,
                     supplied_register_path: Any, extensions: Any, is_keyval: Any, register_paths: Any,
                     yang_type: Any, namespace: Any, defining_module: Any, is_config: Any,
                     has_presence: Any, load: Any) -> None:
            self._default = False
            self._mchanged = False
            self._yang_name = yang_name
            self._parent = parent_instance
            self._choice = choice_member
            self._path_helper = path_helper
            self._supplied_register_path = supplied_register_path
            self._base_type = base_type
            self._is_leaf = is_leaf
            self._is_container = is_container
            self._is_config = is_config
            self._extensionsd = extensions
            self._extmethods = extmethods
            self._is_keyval = is_keyval
            self._register_paths = register_paths
            self._namespace = namespace
            self._yang_type = yang_type
            self._defining_module = defining_module
            self._metadata = {}
            self._presence = has_presence
            self._cpresent = False

            if default:
                self._default = default
            if len(args):
                self._set()

            if not self._is_container == "list":
                if self._path_helper:
                    if self._supplied_register_path is None:
                        if self._register_paths:
                            self._path_helper.register(self._register_path(), self)
                    else:
                        if self._register_paths:
                            self._path_helper.register(self._supplied_register_path, self)

            if self._is_container == "list" or self._is_container == "container":
                kwargs["path_helper"] = self._path_helper
                if load is not None:
                    kwargs["load"] = load

            try:
                super(YANGBaseClass, self).__init__(*args, **kwargs)
            except TypeError:
                super(YANGBaseClass, self).__init__()

        def _changed(self) -> Any:
            return self._mchanged

        def _extensions(self) -> Any:
            return self._extensionsd

        def _path(self) -> Any:
            return self._register_path()

        def _yang_path(self) -> str:
            return "/" + "/".join(self._register_path())

        def __str__(self) -> str:
            return super(YANGBaseClass, self).__str__()

        def __repr__(self) -> str:
            return super(YANGBaseClass, self).__repr__()

        def _set(self, choice: Any = False) -> None:
            if hasattr(self, "__choices__") and choice:
                for ch in self.__choices__:
                    if ch == choice[0]:
                        for case in self.__choices__[ch]:
                            if not case == choice[1]:
                                for elem in self.__choices__[ch][case]:
                                    method = "_unset_%s" % elem
                                    if not hasattr(self, method):
                                        raise AttributeError("unmapped choice!")
                                    getattr(self, method)()
            if self._choice and not choice:
                choice = self._choice
            self._mchanged = True
            if self._presence:
                self._cpresent = True
            if self._parent and hasattr(self._parent, "_set"):
                self._parent._set(choice=choice)

        def _add_metadata(self, k: Any, v: Any) -> None:
            self._metadata[k] = v

        def yang_name(self) -> Any:
            return self._yang_name

        def default(self) -> Any:
            return self._default

        def __setitem__(self, *args: Any, **kwargs: Any) -> None:
            self._set()
            super(YANGBaseClass, self).__setitem__(*args, **kwargs)

        def append(self, *args: Any, **kwargs: Any) -> None:
            if not hasattr(super(YANGBaseClass, self), "append"):
                raise AttributeError("%s object has no attribute append" % base_type)
            self._set()
            super(YANGBaseClass, self).append(*args, **kwargs)

        def pop(self, *args: Any, **kwargs: Any) -> Any:
            if not hasattr(super(YANGBaseClass, self), "pop"):
                raise AttributeError("%s object has no attribute pop" % base_type)
            self._set()
            return super(YANGBaseClass, self).pop(*args, **kwargs)

        def remove(self, *args: Any, **kwargs: Any) -> None:
            if not hasattr(super(YANGBaseClass, self), "remove"):
                raise AttributeError("%s object has no attribute remove" % base_type)
            self._set()
            if self._path_helper:
                elem_index = super(YANGBaseClass, self).index(*args, **kwargs)
                super(YANGBaseClass, self).__getitem__(elem_index)
            super(YANGBaseClass, self).remove(*args, **kwargs)

        def extend(self, *args: Any, **kwargs: Any) -> None:
            if not hasattr(super(YANGBaseClass, self), "extend"):
                raise AttributeError("%s object has no attribute extend" % base_type)
            self._set()
            super(YANGBaseClass, self).extend(*args, **kwargs)

        def insert(self, *args: Any, **kwargs: Any) -> None:
            if not hasattr(super(YANGBaseClass, self), "insert"):
                raise AttributeError("%s object has no attribute insert" % base_type)
            self._set()
            super(YANGBaseClass, self).insert(*args, **kwargs)

        def _register_path(self) -> Any:
            if self._supplied_register_path is not None:
                return self._supplied_register_path
            if self._parent is not None:
                return self._parent._path() + [self._yang_name]
            return []

        def _set_present(self, present: bool = True) -> None:
            if not self._is_container == "container":
                raise AttributeError("Cannot set presence on a non-container")
            self._cpresent = present
            if present is True:
                self._set()
            if present is False:
                self._mchanged = False

        def _present(self) -> Any:
            if not self._is_container == "container":
                return None
            if self._presence is False:
                return None
            return self._cpresent

    return YANGBaseClass


def YANGDynClass(*args: Any, **kwargs: Any) -> Any:
    """pyangbind's YANGDynClass, its class taken from a cache when the base allows."""
    base_type = kwargs.get("base", False)
    if not base_type:
        raise TypeError("must have a base type")
    if kwargs.get("extmethods"):
        return ORIGINAL["YANGDynClass"](*args, **kwargs)
    if isinstance(base_type, list):
        # a union: the type is inferred from the argument, as pyangbind does
        if not len(args):
            base_type = base_type[0]
        else:
            type_test = False
            for candidate_type in base_type:
                try:
                    type_test = candidate_type(args[0])
                    break
                except Exception:
                    pass
            if type_test is False:
                raise TypeError("did not find a valid type using the argument as a" + " hint")
            base_type = candidate_type
    if not _cacheable_base(base_type):
        kwargs["base"] = base_type
        return ORIGINAL["YANGDynClass"](*args, **kwargs)
    pop = kwargs.pop
    pop("base")
    extmethods = pop("extmethods", None)
    default = pop("default", False)
    yang_name = pop("yang_name", False)
    parent_instance = pop("parent", False)
    choice_member = pop("choice", False)
    is_container = pop("is_container", False)
    is_leaf = pop("is_leaf", False)
    path_helper = pop("path_helper", None)
    supplied_register_path = pop("register_path", None)
    extensions = pop("extensions", None)
    is_keyval = pop("is_keyval", False)
    register_paths = pop("register_paths", True)
    yang_type = pop("yang_type", None)
    namespace = pop("namespace", None)
    defining_module = pop("defining_module", None)
    load = pop("load", None)
    is_config = pop("is_config", True)
    has_presence = pop("presence", None)

    slotted = yang_type in ["container", "list"] or is_container == "container"
    key = (base_type, slotted)
    cls = _dyn.get(key)
    if cls is None:
        with _lock:
            cls = _dyn.get(key)
            if cls is None:
                cls = _dyn[key] = _dyn_class(base_type, slotted)
    obj = cls.__new__(cls, *args, **kwargs)
    obj._fb_init(args, kwargs, extmethods, default, yang_name, parent_instance, choice_member, is_container, is_leaf,
                 path_helper, supplied_register_path, extensions, is_keyval, register_paths, yang_type,
                 namespace, defining_module, is_config, has_presence, load)
    return obj


_installed = False


def install() -> None:
    """Put the cached factories in pyangbind.lib.yangtypes (idempotent)."""
    global _installed
    if _installed:
        return
    yangtypes.YANGDynClass = YANGDynClass
    yangtypes.RestrictedClassType = RestrictedClassType
    yangtypes.RestrictedPrecisionDecimalType = RestrictedPrecisionDecimalType
    yangtypes.TypedListType = TypedListType
    yangtypes.YANGListType = YANGListType
    _installed = True


def pyangbind_build(module: str) -> ModuleType:
    """A bindings module (name under sdqkd.bindings) loaded afresh with pyangbind's own
    factories, as a reference for tests and benchmarks."""
    from sdqkd import yangmodels

    uninstall()
    try:
        path = yangmodels.BINDINGS_DIR / f"{module}.py"
        spec = importlib.util.spec_from_file_location(f"_pyangbind_{module}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        install()
    return mod


def uninstall() -> None:
    """pyangbind's own factories again (bindings imported meanwhile keep the fast ones)."""
    global _installed
    for name, fn in ORIGINAL.items():
        setattr(yangtypes, name, fn)
    _installed = False
