"""Schema-level comparison of YANG modules with the pyang API.

`compare()` loads two sets of modules ("ours" and "official"), expands them
(groupings, augments, typedef chains, leafrefs) and compares what matters on
the wire; descriptions, references and statement order are ignored.

- mode="subset": every schema node of ours (data tree, rpcs, notifications,
  including augmented nodes) exists in the official tree with the same
  keyword, config, keys, unique, mandatory, min/max-elements, presence,
  default, ordered-by, status, units, when, must, if-feature and a fully
  resolved type (typedef chain, enums, bits, identity bases, leafref path and
  target, restrictions). No official node that is required (mandatory,
  min-elements > 0, or a non-presence container holding one) may be missing
  under a node we keep. Module headers (namespace, prefix, latest revision,
  imports) match, and every top-level typedef, identity, feature, grouping
  and augment of ours exists in the official module with the same definition.
- mode="equal": the same, plus everything official must exist in ours.

`allowed` maps a `when` expression of ours to the upstream expression it
replaces on purpose. Any other `when` difference is still reported, and so is
an allowed expression that no longer occurs in ours.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Union

from pyang import context, error, repository, util

PathLike = Union[str, os.PathLike]

DATA_KW = {"container", "list", "leaf", "leaf-list", "choice", "case",
           "anydata", "anyxml", "rpc", "action", "notification", "input",
           "output"}
NODE_PROPS = ("mandatory", "min-elements", "max-elements", "ordered-by",
              "status", "units")
_PREFIXED = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*):(?!:)")


class YangLoadError(Exception):
    """A module set does not compile with pyang."""


def load(files: Iterable[PathLike], path: PathLike | Iterable[PathLike]):
    """Parse and validate `files`; imports are searched in `path` (a directory
    or a list of them, searched recursively). Returns {module name: module}."""
    dirs = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    repo = repository.FileRepository(os.pathsep.join(map(str, dirs)),
                                     use_env=False)
    ctx = context.Context(repo)
    mods = []
    for f in files:
        m = ctx.add_module(str(f), Path(f).read_text(encoding="utf-8"))
        if m is None:
            raise YangLoadError("%s: cannot be parsed: %s" % (f, _errors(ctx)))
        mods.append(m)
    ctx.validate()
    if _errors(ctx):
        raise YangLoadError("pyang errors:\n" + _errors(ctx))
    return {m.arg: m for m in mods}


def _errors(ctx):
    return "\n".join("%s: %s" % (pos, error.err_to_str(tag, args))
                     for pos, tag, args in ctx.errors
                     if error.is_error(error.err_level(tag)))


# --- canonical signatures --------------------------------------------------

def _mod(stmt):
    return stmt.i_module.i_modulename


def _qname(stmt):
    return (_mod(stmt), stmt.arg)


def _resolve(stmt, text):
    """`text` (XPath, identity, if-feature) with prefixes made module names."""
    def repl(mo):
        m = util.prefix_to_module(stmt.i_module, mo.group(1), stmt.pos, [])
        return (m.arg if m is not None else "?" + mo.group(1)) + ":"
    return _PREFIXED.sub(repl, text)


def _arg(stmt, kw):
    s = stmt.search_one(kw)
    return s.arg if s is not None else None


def _node_path(stmt):
    """Schema path of a data node, as a tuple of (module, name)."""
    parts = []
    while stmt is not None and stmt.keyword in DATA_KW:
        parts.append(_qname(stmt))
        stmt = getattr(stmt, "i_augment_parent", None) or stmt.parent
        if stmt is not None and stmt.keyword == "augment":
            stmt = stmt.i_target_node
    return tuple(reversed(parts))


def _typedef_sig(td):
    return (_mod(td), td.arg, _type_sig(td.search_one("type")),
            _arg(td, "default"), _arg(td, "units"), _arg(td, "status"))


def _type_sig(type_stmt, leaf=None):
    """Fully resolved, comparable signature of a `type` statement."""
    td = getattr(type_stmt, "i_typedef", None)
    sig = [("typedef", _typedef_sig(td)) if td is not None
           else ("builtin", type_stmt.arg)]
    for sub in type_stmt.substmts:
        kw = sub.keyword
        if kw in ("description", "reference"):
            continue
        if kw in ("enum", "bit"):
            sig.append((kw, sub.arg, _arg(sub, "value"), _arg(sub, "position"),
                        _arg(sub, "status"), _features(sub)))
        elif kw == "base":
            ident = getattr(sub, "i_identity", None)
            sig.append((kw, _qname(ident) if ident is not None
                        else _resolve(type_stmt, sub.arg)))
        elif kw == "path":
            sig.append((kw, _resolve(type_stmt, sub.arg)))
        elif kw == "type":
            sig.append(("member", _type_sig(sub)))
        else:  # range, length, pattern, fraction-digits, require-instance
            sig.append((kw, sub.arg,
                        tuple(_arg(sub, k) for k in ("modifier", "error-message"))))
    if leaf is not None and getattr(leaf, "i_leafref_ptr", None):
        sig.append(("leafref-target", _node_path(leaf.i_leafref_ptr[0])))
    return tuple(sig)


def _features(stmt):
    return tuple(sorted(_resolve(stmt, s.arg) for s in stmt.search("if-feature")))


class _Comparer:
    def __init__(self, allowed: Mapping[str, str]):
        self.allowed = dict(allowed)
        self.used: set[str] = set()
        self.errors: list[str] = []

    def _whens(self, node, rewrite):
        # pyang copies the `when` of a `uses` onto the nodes it adds, but not
        # the `when` of an `augment`: take that from the augment.
        aug = getattr(node, "i_augment", None)
        whens = [("", w) for w in node.search("when")] + [
            ("augment: ", w) for w in (aug.search("when") if aug else [])]
        out = []
        for label, w in whens:
            e = w.arg
            if rewrite and e in self.allowed:
                self.used.add(e)
                e = self.allowed[e]
            out.append(label + _resolve(w, e))
        return tuple(sorted(out))

    def props(self, node, resolved, rewrite):
        p = {"keyword": node.keyword, "config-stmt": _arg(node, "config"),
             "presence": node.search_one("presence") is not None,
             "default": tuple(sorted(d.arg for d in node.search("default"))),
             "when": self._whens(node, rewrite),
             "must": tuple(sorted(_resolve(node, m.arg)
                                  for m in node.search("must"))),
             "if-feature": _features(node) + (
                 _features(node.i_augment) if hasattr(node, "i_augment") else ())}
        p.update((kw, _arg(node, kw)) for kw in NODE_PROPS)
        if resolved:
            p["config"] = getattr(node, "i_config", None)
        if node.keyword == "list":
            key = _arg(node, "key")
            p["key"] = tuple(key.split()) if key else None
            p["unique"] = tuple(sorted(u.arg for u in node.search("unique")))
        t = node.search_one("type")
        if t is not None:
            p["type"] = _type_sig(t, node if resolved else None)
        return p

    def tree(self, a, b, path, names, *, props, required, resolved=True):
        """Every child of `a` exists in `b` (recursively); with `props`, with
        the same properties; with `required`, no required child of `b` is
        missing in `a`. `names` = (label of a, label of b)."""
        ac, bc = _children(a), _children(b)
        for name, x in ac.items():
            p = "%s/%s:%s" % ((path,) + name)
            y = bc.get(name)
            if y is None:
                self.errors.append("node missing in %s: %s" % (names[1], p))
                continue
            if props:
                px = self.props(x, resolved, rewrite=True)
                py = self.props(y, resolved, rewrite=False)
                for k in sorted(set(px) | set(py)):
                    if px.get(k) != py.get(k):
                        self.errors.append("%s: %s differs: %s=%r %s=%r" % (
                            p, k, names[0], px.get(k), names[1], py.get(k)))
            self.tree(x, y, p, names, props=props, required=required,
                      resolved=resolved)
        if required:
            for name, y in bc.items():
                if name not in ac and _is_required(y):
                    self.errors.append("required %s node omitted: %s/%s:%s"
                                       % ((names[1], path) + name))

    def modules(self, a_mods, b_mods, names, *, full, required):
        """Modules of `a_mods` against `b_mods`. `full`: compare properties and
        definitions (needed in one direction only); else presence only."""
        errs = self.errors
        for name, a in a_mods.items():
            b = b_mods.get(name)
            if b is None:
                errs.append("module %s missing in %s" % (name, names[1]))
                continue
            if full:
                for kw in ("namespace", "prefix", "yang-version"):
                    if _arg(a, kw) != _arg(b, kw):
                        errs.append("%s: %s %s=%r %s=%r" % (
                            name, kw, names[0], _arg(a, kw), names[1], _arg(b, kw)))
                if _revision(a) != _revision(b):
                    errs.append("%s: revision %s=%r %s=%r" % (
                        name, names[0], _revision(a), names[1], _revision(b)))
            b_imports = {i.arg: _arg(i, "prefix") for i in b.search("import")}
            for i in a.search("import"):
                if b_imports.get(i.arg) != _arg(i, "prefix"):
                    errs.append("%s: import %s (prefix %s) not in %s"
                                % (name, i.arg, _arg(i, "prefix"), names[1]))
            self.tree(a, b, "", names, props=full, required=required)
            for kind, a_defs, b_defs, sig in (
                    ("typedef", a.i_typedefs, b.i_typedefs, _typedef_sig),
                    ("identity", a.i_identities, b.i_identities, _identity_sig),
                    ("feature", a.i_features, b.i_features, _feature_sig)):
                for dname, d in a_defs.items():
                    if dname not in b_defs:
                        errs.append("%s: %s %s missing in %s"
                                    % (name, kind, dname, names[1]))
                    elif full and sig(d) != sig(b_defs[dname]):
                        errs.append("%s: %s %s differs: %s=%r %s=%r" % (
                            name, kind, dname, names[0], sig(d),
                            names[1], sig(b_defs[dname])))
            # Groupings: compared unexpanded (config, leafref targets and
            # inherited properties only exist once the grouping is used).
            for gname, g in a.i_groupings.items():
                if gname not in b.i_groupings:
                    errs.append("%s: grouping %s missing in %s"
                                % (name, gname, names[1]))
                else:
                    self.tree(g, b.i_groupings[gname],
                              "grouping %s:%s" % (name, gname), names,
                              props=full, required=required, resolved=False)
            b_augs = {_augment_sig(x) for x in b.search("augment")}
            for x in a.search("augment"):
                if _augment_sig(x) not in b_augs:
                    errs.append("%s: augment %s missing in %s"
                                % (name, _augment_sig(x), names[1]))


def _children(node):
    return {_qname(c): c for c in getattr(node, "i_children", [])
            if c.keyword in DATA_KW}


def _is_required(node):
    kw = node.keyword
    if kw in ("leaf", "choice", "anydata", "anyxml"):
        return _arg(node, "mandatory") == "true"
    if kw in ("list", "leaf-list"):
        return int(_arg(node, "min-elements") or 0) > 0
    if kw == "container" and node.search_one("presence") is None:
        return any(_is_required(c) for c in _children(node).values())
    return False


def _revision(mod):
    return max((r.arg for r in mod.search("revision")), default=None)


def _identity_sig(idn):
    bases = sorted(_qname(b.i_identity) if getattr(b, "i_identity", None)
                   else _resolve(idn, b.arg) for b in idn.search("base"))
    return (tuple(bases), _arg(idn, "status"), _features(idn))


def _feature_sig(feat):
    return (_arg(feat, "status"), _features(feat))


def _augment_sig(aug):
    """Target only: its when/if-feature are compared on the augmented nodes."""
    return _resolve(aug, aug.arg)


def compare(ours_files: Iterable[PathLike], ours_path, official_files:
            Iterable[PathLike], official_path, *, mode: str = "subset",
            allowed: Mapping[str, str] | None = None) -> list[str]:
    """Mismatches between our modules and the official ones ([] when OK).

    `*_files` are the module files to compare (matched by module name),
    `*_path` the directory or directories their imports are found in.
    `allowed` maps a `when` expression of ours to the upstream one it replaces.
    Raises YangLoadError if either side does not compile.
    """
    if mode not in ("subset", "equal"):
        raise ValueError("mode must be 'subset' or 'equal', not %r" % mode)
    ours = load(ours_files, ours_path)
    official = load(official_files, official_path)
    c = _Comparer(allowed or {})
    c.modules(ours, official, ("ours", "official"), full=True,
              required=(mode == "subset"))
    if mode == "equal":
        c.modules(official, ours, ("official", "ours"), full=False,
                  required=False)
    for expr in sorted(set(c.allowed) - c.used):
        c.errors.append("allowed when difference no longer present: %r" % expr)
    return c.errors
