"""The Makefile's Debian package list is complete: every external program the code, the tests
and the benchmarks run, every strongSwan plugin charon loads and every shared library our
Python extensions link against comes from a package the Makefile names (or from Debian's base
system: Essential or Priority required, and what those depend on).

A green CI once hid a missing package (libstrongswan-extra-plugins, charon's curve25519)
because an earlier session had installed it by hand. This test finds what is used by reading
the code (every subprocess argv and shutil.which), not from a list kept beside it, asks dpkg
which package owns each file, and checks the Makefile's list; the last test removes each
package the list needs and checks that this one then fails."""
from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdqkd.agents.qaas import strongswan
from testlib import REPO

SCANNED = ("agents", "controller", "lab", "sdqkd", "tapi", "tools", "tests", "bench")
PLUGIN_DIR = Path("/usr/lib/ipsec/plugins")
# argv prefixes that run another program: what follows (after options) is checked too.
WRAPPERS = {"unshare": {"--propagation"}, "nsenter": {"--target", "-t"}, "timeout": set(), "env": set()}
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# What runs the README's commands themselves: there before any of ours.
PREREQUISITES = {"make"}


@dataclass(frozen=True)
class Use:
    """One external file the project needs at run time, and where it is needed."""

    what: str  # a program name or an absolute path
    where: str  # file:line, or what loads it
    bench_only: bool = False


# --- what the project uses ------------------------------------------------------------------


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "string" assignments (e.g. CHARON = "/usr/lib/ipsec/charon")."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
    return out


def _argv_programs(elts: list[ast.expr], consts: dict[str, str]) -> list[str]:
    """The program an argv runs, and the one it wraps (ip netns exec NS PROG, unshare ... PROG)."""
    words: list[str | None] = []
    for e in elts:
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            words.append(e.value)
        elif isinstance(e, ast.Name) and e.id in consts:
            words.append(consts[e.id])
        else:
            words.append(None)  # computed: a namespace, a path, sys.executable
    progs: list[str] = []
    while words and words[0]:
        prog = words[0]
        progs.append(prog)
        name = Path(prog).name
        if name == "ip" and words[1:3] == ["netns", "exec"]:
            words = words[4:]
        elif name in ("sh", "bash") and words[1:2] == ["-c"] and words[2]:
            progs.extend(_script_programs(words[2], words[3:]))
            break
        elif name in WRAPPERS:
            rest, i = words[1:], 0
            while i < len(rest) and rest[i] is not None and rest[i].startswith("-"):
                i += 2 if rest[i] in WRAPPERS[name] else 1
            words = rest[i:]
        else:
            break
    return progs


def _script_programs(script: str, args: list[str | None]) -> list[str]:
    """The command of each step of `sh -c SCRIPT $0 $1 ...` ("$1" is args[1])."""
    progs = []
    for step in re.split(r"&&|\|\||;|\|", script):
        words = [w for w in shlex.split(step) if w != "exec"]
        if not words:
            continue
        m = re.fullmatch(r"\$(\d)", words[0])
        prog = args[int(m.group(1))] if m and int(m.group(1)) < len(args) else None if m else words[0]
        if prog:
            progs.append(prog)
    return progs


def _is_call(func: ast.expr, module: str, names: set[str]) -> bool:
    return isinstance(func, ast.Attribute) and func.attr in names and isinstance(func.value, ast.Name) and func.value.id == module


def program_uses() -> list[Use]:
    uses = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            consts = _constants(tree)
            rel = path.relative_to(REPO)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                first = node.args[0]
                progs: list[str] = []
                if _is_call(node.func, "subprocess", {"run", "Popen", "call", "check_call", "check_output"}):
                    if isinstance(first, (ast.List, ast.Tuple)):
                        progs = _argv_programs(first.elts, consts)
                    elif isinstance(first, ast.Constant) and isinstance(first.value, str):
                        progs = _argv_programs([ast.Constant(w) for w in first.value.split()], consts)
                elif _is_call(node.func, "asyncio", {"create_subprocess_exec"}) or _is_call(node.func, "shutil", {"which"}):
                    progs = _argv_programs(list(node.args), consts)[:1]
                elif _is_call(node.func, "os", {"access"}):  # os.access(PROGRAM, os.X_OK)
                    if len(node.args) > 1 and isinstance(node.args[1], ast.Attribute) and node.args[1].attr == "X_OK":
                        progs = _argv_programs([first], consts)[:1]
                for p in progs:
                    uses.append(Use(p, f"{rel}:{node.lineno}", bench_only=top == "bench"))
    return uses


def plugin_uses() -> list[Use]:
    """Every plugin of every `load =` line of the strongswan.conf our charons run with."""
    conf = strongswan.strongswan_conf(Path(tempfile.gettempdir()))
    uses = []
    for section, names in re.findall(r"^(\w+) \{\n\s*load = ([^\n]+)", conf, re.M):
        for name in names.split():
            uses.append(Use(str(PLUGIN_DIR / f"libstrongswan-{name}.so"), f"strongswan.conf {section} load"))
    return uses


def _elf_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.so*") if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]


def library_uses() -> list[Use]:
    """Shared libraries of the Python extensions installed in the environment running the tests."""
    venv = Path(sys.prefix)
    uses = []
    for lib in _elf_files(venv / "lib"):
        out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+) => (not found|(\S+))", line)
            if not m:
                continue
            if m.group(2) == "not found":
                uses.append(Use(m.group(1), f"{lib.relative_to(venv)} (ldd: not found)"))
            elif not Path(m.group(3)).resolve().is_relative_to(venv):  # a wheel's own bundled copy
                uses.append(Use(m.group(3), str(lib.relative_to(venv))))
    return uses


# --- what Debian says -------------------------------------------------------------------------


def _locate(what: str) -> str | None:
    if what.startswith("/"):
        return what if os.path.exists(what) else None
    return shutil.which(what, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def _variants(path: str) -> list[str]:
    """dpkg records /bin/ip, PATH finds /usr/bin/ip (merged /usr): ask for every spelling."""
    out = [path, os.path.realpath(path)]
    for p in list(out):
        out.append(p.removeprefix("/usr") if p.startswith("/usr/") else "/usr" + p)
    return list(dict.fromkeys(out))


def owners(paths: list[str]) -> dict[str, str]:
    """path -> the Debian package that installed it (dpkg -S), for those dpkg knows."""
    asked = {v: p for p in paths for v in _variants(p)}
    res = subprocess.run(["dpkg-query", "-S", *asked], capture_output=True, text=True)
    found: dict[str, str] = {}
    for line in res.stdout.splitlines():
        pkgs, _, file = line.partition(": ")
        if file in asked and "diversion" not in pkgs:
            found.setdefault(asked[file], pkgs.split(",")[0].split(":")[0].strip())
    return found


@functools.cache
def base_system() -> frozenset[str]:
    """What every Debian system has: Essential and Priority-required packages and their dependencies."""
    fmt = "${Package}\t${Essential}\t${Priority}\t${Pre-Depends}, ${Depends}\t${Provides}\t${db:Status-Abbrev}\n"
    rows = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True, check=True).stdout.splitlines()
    deps: dict[str, list[str]] = {}
    provided: dict[str, set[str]] = {}
    roots = []
    for row in rows:
        name, essential, priority, depends, provides, status = row.split("\t")
        if not status.startswith("ii"):
            continue
        deps[name] = [alt.split("(")[0].split(":")[0].strip() for d in depends.split(",") for alt in d.split("|") if alt.strip()]
        for p in provides.split(","):
            if p.strip():
                provided.setdefault(p.split("(")[0].strip(), set()).add(name)
        if essential == "yes" or priority == "required":
            roots.append(name)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        for real in ({name} if name in deps else provided.get(name, set())) - seen:
            seen.add(real)
            todo.extend(deps.get(real, []))
    return frozenset(seen)


@functools.cache
def makefile_lists() -> dict[str, frozenset[str]]:
    out = subprocess.run(["make", "-s", "-C", str(REPO), "print-debs"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: frozenset(line.split()[1:]) for line in out.splitlines() if line.strip()}


@functools.cache
def needed() -> tuple[tuple[Use, str | None, str | None], ...]:
    """Every use with the file it resolved to and that file's package (None where unknown)."""
    uses = program_uses() + plugin_uses() + library_uses()
    located = {u: _locate(u.what) for u in uses}
    own = owners(sorted({p for p in located.values() if p}))
    return tuple((u, located[u], own.get(located[u]) if located[u] else None) for u in uses)


def problems(debs: frozenset[str], bench_debs: frozenset[str]) -> list[str]:
    """What a machine with only `debs` (and, for benchmarks, `bench_debs`) installed would miss."""
    venv_bin = Path(sys.prefix) / "bin"
    out = []
    for use, path, pkg in needed():
        if use.what in PREREQUISITES or (path and Path(path).parent == venv_bin):
            continue  # a console script of a Python package (pyang, netconf-console2): setup.cfg's business
        allowed = debs | bench_debs if use.bench_only else debs
        if path is None:
            if not use.bench_only:  # benchmarks install BENCH_DEBS themselves when they run
                out.append(f"{use.what} ({use.where}) is not installed: its Debian package is missing from the Makefile's DEBS")
        elif pkg is None:
            out.append(f"{use.what} ({use.where}) is {path}, which no Debian package installed")
        elif pkg not in allowed and pkg not in base_system():
            out.append(f"{use.what} ({use.where}) comes from Debian package {pkg}, which the Makefile's "
                       f"{'BENCH_DEBS' if use.bench_only else 'DEBS'} does not name")
    return sorted(set(out))


# --- tests ------------------------------------------------------------------------------------


def test_the_scan_finds_what_the_project_runs() -> None:
    """The reading of the code sees the programs we know about (a scan that finds nothing passes anything)."""
    programs = {Path(u.what).name for u in program_uses()}
    assert {"charon", "ip", "ping", "unshare", "nsenter", "swanctl", "yanglint", "yangcli", "openssl", "ab",
            "ssh-keygen", "sshd", "netconfd", "make"} <= programs
    plugins = {Path(u.what).name for u in plugin_uses()}
    assert {"libstrongswan-curve25519.so", "libstrongswan-kernel-libipsec.so", "libstrongswan-vici.so"} <= plugins
    assert any(Path(u.what).name == "libssl.so.3" for u in library_uses()), "sslpsk3 links libssl"


def test_every_package_used_is_in_the_makefile() -> None:
    lists = makefile_lists()
    assert problems(lists["DEBS"], lists["BENCH_DEBS"]) == []


def test_makefile_names_only_real_packages() -> None:
    """Each name is a package Debian knows (installed by `make test`), not a typo or a virtual one."""
    lists = makefile_lists()
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\n", *lists["DEBS"]], capture_output=True, text=True)
    assert set(res.stdout.split()) == set(lists["DEBS"]), res.stderr


def test_removing_any_needed_package_fails_the_guard() -> None:
    """Mutation check of the guard: without any one package the list needs, problems() names it."""
    lists = makefile_lists()
    debs, bench = lists["DEBS"], lists["BENCH_DEBS"]
    used = {pkg for _, _, pkg in needed() if pkg} & debs
    assert {"libstrongswan-extra-plugins", "libcharon-extra-plugins", "strongswan-charon", "libstrongswan",
            "libyang2-tools", "yangcli", "openssl", "libssl3", "iproute2", "iputils-ping", "apache2-utils"} <= used
    for pkg in sorted(used):
        found = problems(debs - {pkg}, bench)
        assert any(f"Debian package {pkg}," in p for p in found), f"removing {pkg} went unnoticed"
