#!/usr/bin/env python3
"""Per-kernel resource report of the CUDA build, from ptxas's ``-v`` lines in its log.

``make cuda-compile-check`` builds ``csrc/`` with ``GRADPROJ_PTXAS_VERBOSE=1`` (setup.py
then passes ``-Xptxas -v`` to nvcc), tees the build log, and runs::

    python scripts/cuda_compile_report.py LOG [--json OUT] [--known FILE] [--archs "8.0;9.0"]

For every kernel (entry function) and arch it prints registers per thread, spill
stores/loads, stack frame, static shared memory, the block size it is launched with
(found in ``csrc/cuda``), and blocks per SM: from registers alone (the occupancy
calculator's rule: 4 sub-partitions of 16384 registers, registers allocated per warp
in units of 256) and from all static limits (threads, blocks, registers, static
shared memory). Dynamic shared memory is not visible to ptxas: for a kernel that
declares ``extern __shared__`` (or ``GRADPROJ_DYNAMIC_SMEM``, launch.cuh's spelling of
it) the report names where the launch sizes it and whether the host caps it at
``sharedMemPerBlockOptin``.

Exit status 1 on a violation that ``--known`` does not list, on a stale ``--known``
entry (the ratchet only tightens), or when the log is not what it should be: no
ptxas lines at all, an arch of ``--archs`` missing, an arch whose limits are not in
``ARCHS`` (scripts/arch_limits.py). Kinds of violation (the ``kind`` of a known entry):

* ``spill``: spill stores or loads > 0 (an entry or a device function);
* ``smem``: static shared memory above the per-block static limit (48 KiB);
* ``missing``: a ``__global__`` kernel of the sources has no ptxas entry for an arch.

Known entries (``scripts/cuda_compile_known.json``, a JSON list as
``scripts/gpu_compile_known.json`` of the Triton check; ``{"entries": [...]}`` works too)::

    [{"kernel": "project_rows_kernel<float>", "arch": "sm_80", "kind": "spill",
      "note": "why it is accepted, and until when"}]

``kernel`` is the short name the table prints (or the mangled name).
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path
from arch_limits import ARCHS as ARCHS  # re-exported for callers
from arch_limits import (
    ArchLimits,
    KiB,
    arch_limits,
    blocks_per_sm_regs,
    blocks_per_sm_smem,
    format_table,
)
from arch_limits import blocks_per_sm as _blocks_per_sm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KNOWN = ROOT / "scripts" / "cuda_compile_known.json"
DEFAULT_SOURCES = ROOT / "csrc" / "cuda"
LIMITS_FILE = ROOT / "scripts" / "arch_limits.py"
ASSUMED_THREADS = 256  # block size used for blocks/SM when no launch is found
KINDS = ("spill", "smem", "missing")


# ---------------------------------------------------------------------------
# The ptxas log.
# ---------------------------------------------------------------------------

_COMPILING = re.compile(r"ptxas info\s*:\s*Compiling (entry )?function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"ptxas info\s*:\s*Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*:\s*Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class Record:
    """What ptxas said about one function for one arch."""

    mangled: str
    arch: str
    entry: bool  # a kernel (entry function), not a device function
    registers: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0
    name: str = ""  # demangled (or mangled when no demangler is found)
    short: str = ""  # name without return type, namespaces and parameters


def parse_log(text: str) -> list[Record]:
    """Records of every function ptxas reported, in log order, one per (function, arch).

    Lines of one nvcc run are contiguous (ninja prints a command's output when it
    finishes), so "Used ..." belongs to the last "Compiling ... function" and the
    stack line to the last "Function properties for". A function reported twice for
    one arch (a device function in several call graphs, or one name in two
    translation units) keeps the largest numbers.
    """
    records: dict[tuple[str, str], Record] = {}
    arch: str | None = None
    compiling: Record | None = None
    props: Record | None = None

    def record(name: str, entry: bool) -> Record:
        key = (name, arch or "?")
        if key not in records:
            records[key] = Record(mangled=name, arch=arch or "?", entry=entry)
        rec = records[key]
        rec.entry = rec.entry or entry
        return rec

    for line in text.splitlines():
        if m := _COMPILING.search(line):
            arch = m.group(3)
            compiling = record(m.group(2), entry=bool(m.group(1)))
            props = None
        elif m := _PROPERTIES.search(line):
            props = record(m.group(1), entry=False)
        elif (m := _STACK.search(line)) and props is not None:
            stack, stores, loads = map(int, m.groups())
            props.stack = max(props.stack, stack)
            props.spill_stores = max(props.spill_stores, stores)
            props.spill_loads = max(props.spill_loads, loads)
            props = None
        elif (m := _USED.search(line)) and compiling is not None:
            compiling.registers = max(compiling.registers or 0, int(m.group(1)))
            if s := _SMEM.search(m.group(2)):
                compiling.static_smem = max(compiling.static_smem, int(s.group(1)))
    return list(records.values())


def demangle(names: list[str]) -> dict[str, str]:
    """Demangled names by c++filt (or CUDA's cu++filt); mangled ones kept without either."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run(
            [tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    if len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out, strict=True))


def short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<float, true>(int*, long)`` -> ``k<float, true>``."""
    s = demangled.strip()
    if s.endswith(")"):  # drop the parameter list
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    start, depth, i = 0, 0, 0
    while i < len(s):  # the last component outside <...> and (...)
        c = s[i]
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
        elif depth == 0 and c == " ":
            start = i + 1
        elif depth == 0 and s.startswith("::", i):
            start = i + 2
            i += 1
        i += 1
    return s[start:] or demangled


def base_name(short: str) -> str:
    return short.split("<", 1)[0]


# ---------------------------------------------------------------------------
# The sources: launch block sizes and dynamic shared memory.
# ---------------------------------------------------------------------------


@dataclass
class KernelSource:
    """What the sources say about one ``__global__`` function."""

    name: str
    where: str  # file:line of the definition
    threads: int | None = None
    threads_from: str = ""  # the launch or __launch_bounds__ it was read from
    dynamic_smem: str | None = None  # how the launch sizes it, when the kernel has any
    dynamic_capped: bool = False  # the host keeps it <= sharedMemPerBlockOptin
    # where the block size is a template parameter's expression (mma_rows_kernel's W * 32):
    # the expression, the kernel's template parameters and the constants it may use
    threads_expr: str = ""
    template_params: tuple[str, ...] = ()
    consts: dict[str, int] = field(default_factory=dict, repr=False)

    def threads_of(self, short: str) -> int | None:
        """The block size of the instantiation ``short`` (``k<P, 3, false, 16>``): ``threads``,
        or ``threads_expr`` with the instantiation's integer and bool arguments bound."""
        if self.threads or not self.threads_expr:
            return self.threads
        args = _template_args(short)
        if len(args) != len(self.template_params):
            return None
        bound = dict(self.consts)
        for name, arg in zip(self.template_params, args, strict=True):
            value = {"true": 1, "false": 0}.get(arg, arg)
            if isinstance(value, int) or re.fullmatch(r"-?\d+", value):
                bound[name] = int(value)
        return _eval_int(self.threads_expr, bound)


def _template_args(short: str) -> list[str]:
    """``k<A<x, y>, 3, false>`` -> ``['A<x, y>', '3', 'false']`` ([] without arguments)."""
    if "<" not in short or not short.endswith(">"):
        return []
    return _split_args(short[short.index("<") + 1 : -1], "<([{", ">)]}")


def _strip_comments(text: str) -> str:
    """Comments blanked out (newlines kept, so offsets and line numbers stay)."""

    def blank(m: re.Match) -> str:
        s = m.group(0)
        return s if s[0] in "\"'" else re.sub(r"[^\n]", " ", s)

    return re.sub(
        r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|//[^\n]*|/\*.*?\*/', blank, text, flags=re.S
    )


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.floordiv,  # C++ integer division
    ast.FloorDiv: operator.floordiv,
}


def _eval_int(expr: str, consts: dict[str, int]) -> int | None:
    """An integer constant expression of literals and known constexprs, else None."""
    expr = re.sub(r"\b(\d+)(?:[uU]?[lL]{0,2}|[lL]{1,2}[uU])\b", r"\1", expr.strip())
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None

    def ev(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return consts.get(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            v = ev(node.operand)
            return None if v is None else -v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if a is None or b is None or (isinstance(node.op, ast.Div | ast.FloorDiv) and b == 0):
                return None
            return _BINOPS[type(node.op)](a, b)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "dim3"
        ):
            dims = [ev(a) for a in node.args]
            if any(d is None for d in dims):
                return None
            prod = 1
            for d in dims:
                prod *= d
            return prod
        return None

    return ev(tree)


def _split_args(s: str, opens: str = "([{", closes: str = ")]}") -> list[str]:
    """Comma-separated arguments, commas inside the brackets ``opens`` / ``closes`` kept
    (by default (), [] and {}: a launch's ``<`` may be a comparison)."""
    args, depth, cur = [], 0, ""
    for c in s:
        if c in opens:
            depth += 1
        elif c in closes:
            depth -= 1
        if c == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += c
    if cur.strip():
        args.append(cur.strip())
    return args


def _matching(text: str, i: int, open_c: str, close_c: str) -> int:
    """Index of the bracket closing the one at ``i``."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_c:
            depth += 1
        elif text[j] == close_c:
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


_CONSTEXPR = re.compile(
    r"constexpr\s+(?:unsigned\s+|signed\s+)?(?:int|long|int64_t|int32_t|size_t|auto)\s+"
    r"(\w+)\s*=\s*([^;{]+);"
)
_GLOBAL = re.compile(
    r"__global__\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?void\s+"
    r"(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*\("
)


# The launch helper (csrc/cuda/launch.cuh): launch_kernel<kMaxSmem>(kernel, work, threads,
# smem, args...). Its arguments after the kernel are in the places of <<<grid, threads,
# smem>>>; a kMaxSmem template argument makes it check smem against the kernel's ceiling.
_HELPER = "launch_kernel"
_HELPER_DEF = re.compile(rf"\bvoid\s+{_HELPER}\s*\(")


def _helper_guard(texts: dict[Path, str], rel) -> tuple[str, str] | None:
    """The ``sharedMemPerBlockOptin`` check in the launch helper's body: (statement, where)."""
    for f, text in texts.items():
        if (d := _HELPER_DEF.search(text)) is None:
            continue
        body_open = text.find("{", _matching(text, d.end() - 1, "(", ")"))
        guard = re.compile(r"[^;{}]*sharedMemPerBlockOptin[^;{}]*;?").search(
            text, body_open, _matching(text, body_open, "{", "}")
        )
        if guard is not None:
            at = guard.start() + len(guard.group(0)) - len(guard.group(0).lstrip())
            return " ".join(guard.group(0).split()), f"{rel(f)}:{text.count(chr(10), 0, at) + 1}"
    return None


def scan_sources(src_dir: Path, root: Path = ROOT) -> dict[str, KernelSource]:
    """Every ``__global__`` function of ``src_dir/*.cu`` and ``*.cuh``, by name."""
    files = sorted([*src_dir.glob("*.cuh"), *src_dir.glob("*.cu")])  # headers' constants first
    texts = {f: _strip_comments(f.read_text()) for f in files}

    def rel(f: Path) -> str:
        try:
            return str(f.resolve().relative_to(root))
        except ValueError:
            return str(f)

    helper_guard = _helper_guard(texts, rel)

    header_consts: dict[str, int] = {}
    for f in files:
        if f.suffix == ".cuh":
            for m in _CONSTEXPR.finditer(texts[f]):
                if (v := _eval_int(m.group(2), header_consts)) is not None:
                    header_consts[m.group(1)] = v

    kernels: dict[str, KernelSource] = {}
    for f in files:
        text = texts[f]
        consts = dict(header_consts)
        for m in _CONSTEXPR.finditer(text):
            if (v := _eval_int(m.group(2), consts)) is not None:
                consts[m.group(1)] = v

        def line(pos: int, text: str = text) -> int:
            return text.count("\n", 0, pos) + 1

        for m in _GLOBAL.finditer(text):
            name = m.group(3)
            ks = KernelSource(name=name, where=f"{rel(f)}:{line(m.start(3))}")
            bounds = m.group(1) or m.group(2)
            body_open = text.find("{", _matching(text, m.end() - 1, "(", ")"))
            body = text[body_open : _matching(text, body_open, "{", "}") + 1]
            # csrc/cuda/launch.cuh: GRADPROJ_DYNAMIC_SMEM(T, name) is `extern __shared__ T name[]`
            dynamic = re.search(r"\bextern\s+__shared__\b|\bGRADPROJ_DYNAMIC_SMEM\s*\(", body)
            dynamic = dynamic is not None

            # Launch sites: name<...><<<...>>>, alias<<<...>>> after `auto alias = name<...>;`
            # and launch_kernel<...>(name<...>, ...).
            sites: list[tuple[int, str]] = [
                (s.start(), s.group(1))
                for s in re.finditer(
                    rf"\b{name}\s*(?:<[^<>;{{}}]*>)?\s*<<<(.*?)>>>", text, flags=re.S
                )
            ]
            helper_sites, capped_sites = 0, 0
            for h in re.finditer(
                rf"\b{_HELPER}\s*(<[^<>;{{}}()]*>)?\s*\(\s*{name}\s*(?:<[^<>;{{}}]*>)?\s*,", text
            ):
                close = _matching(text, text.index("(", h.start()), "(", ")")
                sites.append((h.start(), text[h.end() : close]))
                helper_sites += 1
                capped_sites += h.group(1) is not None
            for a in re.finditer(
                rf"\bauto\s+(?:const\s+)?(\w+)\s*=\s*&?\s*{name}\s*(?:<[^<>;{{}}]*>)?\s*;", text
            ):
                # Its first launch before `auto alias = ...` names another kernel.
                again = re.compile(rf"\bauto\s+(?:const\s+)?{a.group(1)}\s*=").search(text, a.end())
                end = again.start() if again else len(text)
                s = re.compile(rf"\b{a.group(1)}\s*<<<(.*?)>>>", re.S).search(text, a.end(), end)
                if s is not None:
                    sites.append((s.start(), s.group(1)))
            sites.sort()
            blocks = []
            for pos, config in sites:
                args = _split_args(config)
                threads = _eval_int(args[1], consts) if len(args) > 1 else None
                blocks.append((pos, threads, args))
            known = [(pos, t) for pos, t, _ in blocks if t is not None]
            # a block size of template parameters: evaluated per instantiation (threads_of)
            exprs = {a[1] for _, t, a in blocks if t is None and len(a) > 1}
            head = re.search(r"template\s*<([^;{}]*)>\s*$", text[: m.start()])
            if known:
                ks.threads = max(t for _, t in known)
                where = ", ".join(f"{rel(f)}:{line(p)}" for p, _ in known)
                several = len({t for _, t in known}) > 1
                ks.threads_from = ("largest of launches " if several else "launch ") + where
            elif bounds and (t := _eval_int(bounds.split(",")[0], consts)) is not None:
                ks.threads = t
                ks.threads_from = f"__launch_bounds__ {ks.where}"
            elif len(exprs) == 1 and head is not None:
                ks.threads_expr = exprs.pop()
                ks.template_params = tuple(
                    p.split()[-1] for p in _split_args(head.group(1)) if p.split()
                )
                ks.consts = consts
                where = ", ".join(f"{rel(f)}:{line(p)}" for p, t, _ in blocks if t is None)
                ks.threads_from = f"launch {where}: {ks.threads_expr}"
            if dynamic:
                # A guard of the helper's covers the kernel when every launch goes through it.
                via_helper = helper_guard if capped_sites and capped_sites == len(sites) else None
                ks.dynamic_smem, ks.dynamic_capped = _dynamic_note(
                    text, blocks, rel(f), line, via_helper
                )
            kernels[name] = ks
    return kernels


def _dynamic_note(
    text: str, blocks: list, path: str, line, helper_guard: tuple[str, str] | None = None
) -> tuple[str, bool]:
    """Where the launches size the kernel's dynamic shared memory; whether the host caps it.

    The cap looked for is a test against ``sharedMemPerBlockOptin`` in the function
    that computes the size (else in the launch helper every launch goes through, given
    as ``helper_guard``, else anywhere in the file): the size then never exceeds the
    arch's opt-in limit, whatever the shapes.
    """
    notes, callees = [], []
    for pos, _, args in blocks:
        if len(args) < 3:
            notes.append(f"launched without a shared-memory size at {path}:{line(pos)}")
            continue
        size = args[2]
        assigns = list(re.finditer(rf"\b{re.escape(size)}\s*=\s*([^;=][^;]*);", text[:pos]))
        if assigns:
            a = assigns[-1]
            sized = " ".join(a.group(1).split())
            notes.append(f"{size} = {sized} ({path}:{line(a.start())}), launch {path}:{line(pos)}")
            if call := re.match(r"(\w+)\s*(?:<[^<>]*>)?\s*\(", sized):
                callees.append(call.group(1))
        else:
            notes.append(f"{size} at launch {path}:{line(pos)}")
    if not notes:
        notes.append(f"no launch found in {path}")
    guard = None
    for callee in callees:  # the guard inside the sizing function
        d = re.search(rf"\b{callee}\s*\([^;{{]*\)\s*{{", text)
        if d is not None:
            body_end = _matching(text, d.end() - 1, "{", "}")
            guard = re.compile(r"[^;{}]*sharedMemPerBlockOptin[^;{}]*;?").search(
                text, d.end(), body_end
            )
            if guard is not None:
                break
    if guard is None and helper_guard is not None:
        stmt, where = helper_guard
        return "; ".join(notes) + f"; capped by `{stmt}` ({where})", True
    if guard is None:
        guard = re.search(r"[^;{}]*sharedMemPerBlockOptin[^;{}]*;?", text)
    if guard is None:
        return "; ".join(notes) + "; no sharedMemPerBlockOptin guard found: size unknown", False
    stmt = " ".join(guard.group(0).split())
    at = guard.start() + len(guard.group(0)) - len(guard.group(0).lstrip())
    return "; ".join(notes) + f"; capped by `{stmt}` ({path}:{line(at)})", True


# ---------------------------------------------------------------------------
# Occupancy and checks.
# ---------------------------------------------------------------------------


def blocks_per_sm(rec: Record, threads: int, lim: ArchLimits) -> tuple[int, str]:
    """Resident blocks per SM from every static limit, and the one that binds."""
    return _blocks_per_sm(rec.registers or 0, threads, rec.static_smem, lim)


@dataclass
class Violation:
    kernel: str  # short name
    arch: str
    kind: str
    detail: str
    mangled: str = ""


@dataclass
class Report:
    kernels: list[dict] = field(default_factory=list)
    functions: list[dict] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    accepted: list[Violation] = field(default_factory=list)
    stale: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the log is not what it should be
    footnotes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.violations or self.stale or self.errors)


def _arch_of(token: str) -> str:
    """``8.0`` / ``9.0a`` / ``sm_90`` -> ``sm_80`` / ``sm_90a`` / ``sm_90``."""
    token = token.strip().replace("+PTX", "")
    return token if token.startswith("sm_") else "sm_" + token.replace(".", "")


def load_known(path: Path | None) -> tuple[list[dict], list[str]]:
    """Known entries and the problems of the file (missing fields, unknown kinds)."""
    if path is None or not path.exists():
        return [], []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [], [f"{path}: not JSON ({exc})"]
    entries = data.get("entries", []) if isinstance(data, dict) else data
    problems = []
    good = []
    for i, e in enumerate(entries if isinstance(entries, list) else []):
        missing = [
            k for k in ("kernel", "arch", "kind", "note") if not isinstance(e, dict) or k not in e
        ]
        if missing:
            problems.append(f"{path}: entry {i} lacks {', '.join(missing)}")
        elif e["kind"] not in KINDS:
            problems.append(f"{path}: entry {i} has kind {e['kind']!r}, not one of {KINDS}")
        elif not str(e["note"]).strip():
            problems.append(f"{path}: entry {i} has an empty note (say why it is accepted)")
        else:
            good.append(e)
    if not isinstance(entries, list):
        problems.append(f"{path}: 'entries' must be a list")
    return good, problems


def analyse(
    text: str,
    sources: dict[str, KernelSource],
    known: list[dict],
    archs: list[str] | None = None,
) -> Report:
    """Records of the log checked against the limits, the sources and the known entries."""
    report = Report()
    records = parse_log(text)
    if not records:
        report.errors.append(
            "no ptxas lines in the log: was it built with -Xptxas -v (GRADPROJ_PTXAS_VERBOSE=1)?"
        )
        return report
    names = demangle(sorted({r.mangled for r in records}))
    demangled = any(names[n] != n for n in names)
    for r in records:
        r.name = names[r.mangled]
        r.short = short_name(r.name)

    seen_archs = sorted({r.arch for r in records})
    for arch in archs or []:
        if arch not in seen_archs:
            report.errors.append(f"no ptxas lines for {arch} (asked for by --archs)")
    for arch in seen_archs:
        if arch_limits(arch) is None:
            report.errors.append(f"no limits known for {arch}: add it to ARCHS in {LIMITS_FILE}")

    found: list[Violation] = []
    assumed = False
    footnote_of: dict[str, int] = {}
    for r in sorted(records, key=lambda r: (not r.entry, r.short, r.arch)):
        lim = arch_limits(r.arch)
        src = sources.get(base_name(r.short))
        row = asdict(r)
        if r.spill_stores or r.spill_loads:
            found.append(
                Violation(
                    r.short,
                    r.arch,
                    "spill",
                    f"{r.spill_stores} bytes spill stores, {r.spill_loads} bytes spill loads",
                    r.mangled,
                )
            )
        if lim is not None and r.static_smem > lim.static_smem_per_block:
            found.append(
                Violation(
                    r.short,
                    r.arch,
                    "smem",
                    f"{r.static_smem} bytes static shared memory > "
                    f"{lim.static_smem_per_block} per block",
                    r.mangled,
                )
            )
        if not r.entry:
            report.functions.append(row)
            continue
        threads = src.threads_of(r.short) if src is not None else None
        row["threads"] = threads or ASSUMED_THREADS
        row["threads_assumed"] = threads is None
        row["threads_from"] = src.threads_from if threads else "assumed"
        row["source"] = src.where if src is not None else None
        assumed = assumed or threads is None
        if lim is not None:
            row["blocks_per_sm_regs"] = blocks_per_sm_regs(r.registers or 0, row["threads"], lim)
            row["blocks_per_sm"], row["blocks_per_sm_limit"] = blocks_per_sm(r, row["threads"], lim)
        if src is not None and src.dynamic_smem:
            row["dynamic_smem"] = src.dynamic_smem
            if lim is not None and src.dynamic_capped:
                row["dynamic_smem_max"] = lim.smem_optin_per_block
                row["blocks_per_sm_at_max_dynamic"] = min(
                    row["blocks_per_sm"], blocks_per_sm_smem(lim.smem_optin_per_block, lim)
                )
            if src.name not in footnote_of:
                footnote_of[src.name] = len(report.footnotes) + 1
                report.footnotes.append(f"{src.name}: dynamic shared memory: {src.dynamic_smem}")
            row["footnote"] = footnote_of[src.name]
        report.kernels.append(row)
    if footnote_of:
        caps = []
        for arch in seen_archs:
            if (lim := arch_limits(arch)) is not None:
                full = blocks_per_sm_smem(lim.smem_optin_per_block, lim)
                caps.append(
                    f"{arch}: <= {lim.smem_optin_per_block // KiB} KiB per block "
                    f"(then {full} block/SM); S bytes allow floor({lim.smem_per_sm // KiB} KiB / "
                    f"(S + {lim.smem_reserved_per_block} B)) blocks/SM"
                )
        report.footnotes.append("dynamic shared memory per arch, where capped: " + "; ".join(caps))
    if assumed:
        report.footnotes.append(
            f"threads marked * : no launch or __launch_bounds__ found in the sources; "
            f"blocks/SM per {ASSUMED_THREADS} threads"
        )

    # Every kernel of the sources, for every arch of the log.
    if demangled and sources:
        for arch in seen_archs:
            built = {base_name(r.short) for r in records if r.entry and r.arch == arch}
            for name, src in sorted(sources.items()):
                if name not in built:
                    found.append(
                        Violation(name, arch, "missing", f"defined at {src.where}, not in the log")
                    )

    # The ratchet: known entries excuse their violation; an entry excusing none is stale.
    def matches(e: dict, v: Violation) -> bool:
        return e["arch"] == v.arch and e["kind"] == v.kind and e["kernel"] in (v.kernel, v.mangled)

    for v in found:
        (report.accepted if any(matches(e, v) for e in known) else report.violations).append(v)
    report.stale = [e for e in known if not any(matches(e, v) for v in found)]
    return report


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def _kib(n: int) -> str:
    return f"{n / KiB:.1f} KiB" if n >= KiB else f"{n} B"


def render(report: Report) -> str:
    head = ("kernel", "arch", "regs", "spill st/ld", "stack", "static smem", "threads",
            "blocks/SM regs", "blocks/SM (limit)", "dyn smem")  # fmt: skip
    rows = []
    for k in report.kernels:
        rows.append(
            (
                k["short"],
                k["arch"],
                str(k["registers"]) if k["registers"] is not None else "?",
                f"{k['spill_stores']}/{k['spill_loads']}",
                _kib(k["stack"]),
                _kib(k["static_smem"]),
                f"{k['threads']}{'*' if k['threads_assumed'] else ''}",
                str(k.get("blocks_per_sm_regs", "?")),
                f"{k['blocks_per_sm']} ({k['blocks_per_sm_limit']})"
                if "blocks_per_sm" in k
                else "?",
                f"yes [{k['footnote']}]" if "footnote" in k else "-",
            )
        )
    lines = format_table(head, rows)
    for f in report.functions:
        lines.append(
            f"device function {f['short']} ({f['arch']}): stack {f['stack']} B, "
            f"spill {f['spill_stores']}/{f['spill_loads']} B"
        )
    for i, note in enumerate(report.footnotes, 1):
        lines.append(f"[{i}] {note}" if not note.startswith("threads marked") else note)
    for v in report.accepted:
        lines.append(f"known {v.kind}: {v.kernel} ({v.arch}): {v.detail}")
    for v in report.violations:
        lines.append(f"FAIL {v.kind}: {v.kernel} ({v.arch}): {v.detail}")
    for e in report.stale:
        lines.append(
            f"FAIL stale known entry (no such violation any more; remove it): "
            f"{e['kernel']} {e['arch']} {e['kind']}"
        )
    for err in report.errors:
        lines.append(f"FAIL {err}")
    n = len(report.kernels)
    spills = sum(
        1 for k in [*report.kernels, *report.functions] if k["spill_stores"] or k["spill_loads"]
    )
    lines.append(
        f"cuda-compile-report: {'OK' if report.ok else 'FAILED'}: {n} kernel builds, "
        f"{spills} with spills, {len(report.violations)} new violations, "
        f"{len(report.accepted)} known, {len(report.stale)} stale"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="build log with ptxas -v lines")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--known", type=Path, default=DEFAULT_KNOWN, help="known violations")
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES, help="the .cu folder")
    parser.add_argument(
        "--archs",
        default="",
        help='archs that must be in the log, as TORCH_CUDA_ARCH_LIST ("8.0;9.0")',
    )
    args = parser.parse_args(argv)

    text = args.log.read_text(errors="replace")
    sources = scan_sources(args.sources) if args.sources.is_dir() else {}
    known, problems = load_known(args.known)
    archs = [_arch_of(a) for a in re.split(r"[;\s]+", args.archs) if a.strip()]
    report = analyse(text, sources, known, archs)
    report.errors.extend(problems)
    print(render(report))
    if args.json is not None:
        payload = asdict(report)
        payload["ok"] = report.ok
        payload["log"] = str(args.log)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
