"""What the compiled train step really does, read from its optimized HLO text.

The analysis that only the dry run (`train/plan.py`'s `dry_run_report` uses the FLOP count), the
benchmarks and the tests need; the training loop never imports it (its FLOPs per token and device
peaks are `gpt2_jax.costs`). FLOPs with while loops (scanned layers) counted as many times as they
run, the bytes each collective moves, and what XLA logged while compiling. What those collectives
should move in theory for a strategy and mesh is `gpt2_jax.hlo.theory`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable

# What XLA's SPMD partitioner logs when it cannot reshard a tensor efficiently and replicates it.
INVOLUNTARY_REMAT = "Involuntary full rematerialization"


def compile_logged(lower: Callable[[], Any]) -> tuple[Any, str]:
    """`(lower().compile(), what XLA wrote to the process's stderr meanwhile)`.

    XLA logs from C++ straight to file descriptor 2, so the descriptor itself is redirected; look
    for `INVOLUNTARY_REMAT` in the text. A program already in JAX's compilation cache logs nothing.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            compiled = lower().compile()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return compiled, f.read().decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# The compiled program: an optimized HLO module read from `compiled.as_text()`.
#
# XLA's own `compiled.cost_analysis()` visits a while loop's body once, whatever its trip count,
# so with scanned layers (nn.scan -> one HLO while loop) it misses (L-1)/L of the layers' FLOPs.
# The walker below reads the optimized HLO text, applies XLA's HloCostAnalysis counting rules
# per instruction (a dot is 2 FLOPs per multiply-add, an elementwise op 1 per output element,
# a reduce the reducer's FLOPs per combined element, a fusion what its fused computation
# holds) and multiplies a while body by the loop's `known_trip_count`. The same walk lists the
# collectives with their group size and how many times each runs per step.
# ---------------------------------------------------------------------------------------------

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")

# HloCostAnalysis counts these as "transcendentals", not FLOPs.
_TRANSCENDENTAL = frozenset(
    "acosh atan2 cbrt cos erf exp expm1 log log1p logistic power rsqrt sin sqrt tan tanh".split()
)
# One FLOP per output element (HloCostAnalysis::HandleElementwiseOp and its callers).
_ELEMENTWISE = frozenset(
    """abs add and ceil clamp compare complex convert count-leading-zeros divide floor imag is-finite
    maximum minimum multiply negate not or popcnt real reduce-precision remainder round-nearest-afz
    round-nearest-even select shift-left shift-right-arithmetic shift-right-logical sign
    stochastic-convert subtract xor""".split()
)
# Instructions whose called computations run (once per execution of the instruction, or trip-count
# times for a while). Reducers (`to_apply` of reduce, scatter, all-reduce, ...) are priced per
# element instead; async-update/-done repeat their start's `calls=` and are not followed.
_CALLERS = frozenset({"fusion", "call", "async-start", "custom-call", "conditional", "while"})

# Ops that keep a value's elements (reordered or retyped at most): an all-reduce's result that
# flows through them into a 1/n dynamic-slice is still only needed as a shard.
_ELEMENT_PRESERVING = frozenset({"bitcast", "copy", "reshape", "transpose", "convert", "get-tuple-element"})

_SHAPE_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


class HloParseError(ValueError):
    """HLO text this parser does not understand (it never guesses a count silently)."""


def _dtype_bytes(dtype: str) -> float:
    if dtype == "pred":
        return 1
    if dtype in ("token", "tuple"):
        return 0
    m = re.match(r"[a-z]+(\d+)", dtype)
    if not m:
        raise HloParseError(f"unknown element type {dtype!r}")
    return int(m.group(1)) / 8


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: element type and dimensions."""

    dtype: str
    dims: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> float:
        return self.elements * _dtype_bytes(self.dtype)


def parse_shape(text: str) -> tuple[Array, ...]:
    """The arrays of an HLO shape ('f32[8,16]{1,0}' or a tuple '(bf16[4], s32[])'), in order."""
    return tuple(
        Array(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE_RE.findall(text)
    )


def _matching(text: str, start: int) -> int:
    """Index just past the bracket closing the one at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise HloParseError(f"unbalanced brackets in {text[start:start + 200]!r}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: `name = shape opcode(operands), attrs`."""

    name: str
    opcode: str
    shape: tuple[Array, ...]
    operands: tuple[str, ...]
    attrs: str
    args: str = ""  # the raw text between the opcode's parentheses (a parameter's number)

    def attr(self, key: str) -> str | None:
        """The raw text of attribute `key=...` (a name, a {...} group or a plain token), or None."""
        m = re.search(r"(?:^|[,\s])" + re.escape(key) + r"=", self.attrs)
        if not m:
            return None
        i = m.end()
        if i < len(self.attrs) and self.attrs[i] in "{[":
            j = _matching(self.attrs, i)
            # replica_groups=[2,4]<=[8] and mesh[...] {...} forms run on past the first bracket
            while j < len(self.attrs) and self.attrs[j] not in ",":
                j += 1
            return self.attrs[i:j].strip()
        j = i
        depth = 0
        while j < len(self.attrs) and (depth or self.attrs[j] != ","):
            if self.attrs[j] in "([{":
                depth += 1
            elif self.attrs[j] in ")]}":
                depth -= 1
            j += 1
        return self.attrs[i:j].strip()

    def called(self, key: str) -> list[str]:
        value = self.attr(key)
        return re.findall(r"%?([\w.\-]+)", value.strip("{}")) if value else []


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    name, rest = m.groups()
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.index(" ") if " " in rest else len(rest)
    shape_text, rest = rest[:end], rest[end:].lstrip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        raise HloParseError(f"cannot read the opcode of {line.strip()[:200]!r}")
    opcode = m.group(1)
    close = _matching(rest, m.end() - 1)
    operand_text = rest[m.end(): close - 1]
    operands = tuple(re.findall(r"%([\w.\-]+)", operand_text))
    return Instruction(name, opcode, parse_shape(shape_text), operands, rest[close:].lstrip(", "), operand_text)


@dataclasses.dataclass
class HloModule:
    """An HLO module's computations (name -> instructions in order) and its entry computation."""

    computations: dict[str, list[Instruction]]
    entry: str
    num_partitions: int = 1
    replica_count: int = 1
    roots: dict[str, str] = dataclasses.field(default_factory=dict)  # computation -> ROOT's name

    def shapes(self, computation: str) -> dict[str, tuple[Array, ...]]:
        return {i.name: i.shape for i in self.computations[computation]}


def parse_hlo(text: str) -> HloModule:
    """Parse the text of an HLO module (`compiled.as_text()`)."""
    computations: dict[str, list[Instruction]] = {}
    entry = None
    current = None
    roots: dict[str, str] = {}
    header = text.split("\n", 1)[0]
    partitions = re.search(r"num_partitions=(\d+)", header)
    replicas = re.search(r"replica_count=(\d+)", header)
    for line in text.splitlines():
        if not line.strip() or line.startswith("HloModule") or line.lstrip().startswith("//"):
            continue
        if current is None:
            m = _COMP_RE.match(line)
            if m:
                current = m.group(2)
                computations[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        instr = _parse_instruction(line)
        if instr is not None:
            computations[current].append(instr)
            if line.lstrip().startswith("ROOT "):
                roots[current] = instr.name
    if entry is None:
        raise HloParseError("no ENTRY computation in the HLO text")
    return HloModule(
        computations, entry,
        int(partitions.group(1)) if partitions else 1,
        int(replicas.group(1)) if replicas else 1,
        roots,
    )


def trip_count(instr: Instruction) -> int:
    """A while loop's trip count from its backend_config (XLA's `known_trip_count`)."""
    m = _TRIP_RE.search(instr.attrs)
    if not m:
        raise HloParseError(f"while loop {instr.name} has no known_trip_count in its backend_config")
    return int(m.group(1))


def group_size(instr: Instruction, module: HloModule) -> int:
    """Devices in each replica group of a collective (all groups of an op have the same size).

    Reads the three spellings XLA prints: explicit groups `{{0,1},{2,3}}`, iota groups
    `[2,4]<=[8]` (2 groups of 4) and mesh groups `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` (the
    product of the named axes' sizes). No groups, or `{}`, means every device.
    """
    groups = instr.attr("replica_groups")
    everyone = module.num_partitions * module.replica_count
    if groups is None or groups.replace(" ", "") in ("{}", "{{}}"):
        return everyone
    if groups.startswith("mesh"):
        # mesh['a'=2,'b'=4] {'b'}, possibly with a device order between: , device_ids=([4,2]T(1,0))
        m = re.search(r"replica_groups=mesh\[(.*?)\](?:,\s*device_ids=\(.*?\))?\s*\{(.*?)\}", instr.attrs)
        if not m:
            raise HloParseError(f"unreadable replica_groups {groups!r} in {instr.name}")
        sizes = dict(re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1)))
        axes = re.findall(r"'([^']+)'", m.group(2))
        if not axes or any(a not in sizes for a in axes):
            raise HloParseError(f"unreadable replica_groups {groups!r} in {instr.name}")
        return math.prod(int(sizes[a]) for a in axes)
    if groups.startswith("["):
        dims = [int(d) for d in groups[1: groups.index("]")].split(",")]
        return dims[-1]
    if groups.startswith("{"):
        first = re.search(r"\{([\d,\s]*)\}", groups[1:])
        if not first:
            raise HloParseError(f"unreadable replica_groups {groups!r} in {instr.name}")
        return len([d for d in first.group(1).split(",") if d.strip()])
    raise HloParseError(f"unreadable replica_groups {groups!r} in {instr.name}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled program and what it moves per device.

    `full_bytes` is S, the bytes of the whole array the collective works on (the gathered result of
    an all-gather, the input of a reduce-scatter, the array of an all-reduce, all-to-all or
    collective-permute); `group` the devices in each group; `count` how many times it runs per step
    (the product of the trip counts of the while loops around it).
    """

    kind: str
    name: str
    computation: str
    full_bytes: float
    group: int
    count: int
    dtypes: tuple[str, ...]
    # For an all-reduce: the bytes of its arrays of which every use keeps only a 1/group
    # dynamic-slice (each device then needs only its shard: a reduce-scatter written as
    # all-reduce + dynamic-slice, which XLA:CPU leaves as it is and GPU/TPU compilers rewrite).
    sliced_bytes: float = 0.0
    op_name: str = ""  # the JAX operation it came from (HLO metadata), for reading the listing

    @property
    def bytes_per_run(self) -> float:
        """Bytes each device sends per execution under the ring convention (see `ring_bytes`)."""
        return ring_bytes(self.kind, self.full_bytes, self.group)

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_per_run * self.count

    def bytes_by_kind(self, slices_as_reduce_scatter: bool = False) -> dict[str, float]:
        """{kind: bytes per device per step}; optionally the sliced part of an all-reduce as a reduce-scatter."""
        if not (slices_as_reduce_scatter and self.kind == "all-reduce" and self.sliced_bytes):
            return {self.kind: self.bytes_per_step}
        rest = self.full_bytes - self.sliced_bytes
        return {
            "all-reduce": ring_bytes("all-reduce", rest, self.group) * self.count,
            "reduce-scatter": ring_bytes("reduce-scatter", self.sliced_bytes, self.group) * self.count,
        }


def ring_bytes(kind: str, full_bytes: float, group: int) -> float:
    """Bytes one device sends for a collective over an array of `full_bytes` bytes and `group` devices.

    The ring algorithms' traffic: an all-gather, reduce-scatter or all-to-all moves (n-1)/n of the
    array per device, an all-reduce (a reduce-scatter then an all-gather) twice that, a
    collective-permute the whole buffer once. A group of one moves nothing.
    """
    n = group
    if kind == "collective-permute":
        return float(full_bytes)
    if n <= 1:
        return 0.0
    factor = 2.0 if kind == "all-reduce" else 1.0
    return factor * (n - 1) / n * full_bytes


def _op_name(instr: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', instr.attrs)
    return m.group(1) if m else ""


def _collective_kind(opcode: str) -> str | None:
    for kind in COLLECTIVE_KINDS:
        if opcode in (kind, kind + "-start"):
            return kind
    return None


def _full_bytes(kind: str, instr: Instruction, group: int) -> float:
    arrays = instr.shape
    if instr.opcode.endswith("-start"):
        if kind == "all-gather":
            arrays = arrays[len(arrays) // 2:]  # ((operands...), (results...))
        elif kind == "collective-permute":
            arrays = arrays[:1]  # (operand, result, contexts...)
    total = sum(a.bytes for a in arrays)
    if kind == "reduce-scatter":
        total *= group  # the result is one shard of the reduced array
    return total


def _branches(instr: Instruction) -> list[str]:
    return instr.called("branch_computations") or instr.called("true_computation") + instr.called("false_computation")


class _Walker:
    """Per-computation FLOPs and collectives of a module, memoized, while bodies x trip count."""

    def __init__(self, module: HloModule, use_trip_counts: bool = True):
        self.m = module
        self.use_trip_counts = use_trip_counts
        self._cost: dict[str, dict[str, float]] = {}
        self._shapes: dict[str, dict[str, tuple[Array, ...]]] = {}
        self._users: dict[str, dict[str, list[tuple[Instruction, int]]]] = {}

    def users(self, comp: str) -> dict[str, list[tuple[Instruction, int]]]:
        if comp not in self._users:
            table: dict[str, list[tuple[Instruction, int]]] = {}
            for instr in self.m.computations[comp]:
                for i, op in enumerate(instr.operands):
                    table.setdefault(op, []).append((instr, i))
            self._users[comp] = table
        return self._users[comp]

    def only_sliced(self, comp: str, name: str, elements: int, n: int, outer: tuple = ()) -> bool:
        """Whether every use of value `name` (of `elements` elements) keeps only a 1/n dynamic-slice.

        Follows the value through element-preserving ops (converts, bitcasts, copies, transposes,
        elementwise arithmetic), into fusions (the matching fused parameter) and out of them again
        when it reaches a fused computation's ROOT (`outer` holds the fusions entered).
        """
        users = self.users(comp).get(name, [])
        if not users:
            if outer and self.m.roots.get(comp) == name:
                fusion, outer_comp = outer[-1]
                return self.only_sliced(outer_comp, fusion.name, elements, n, outer[:-1])
            return False
        for instr, i in users:
            if instr.opcode in ("dynamic-slice", "slice") and i == 0:
                if instr.shape[0].elements * n != elements:
                    return False
            elif instr.opcode == "fusion":
                callee = instr.called("calls")[0]
                params = [p for p in self.m.computations[callee]
                          if p.opcode == "parameter" and p.args.strip() == str(i)]
                if not params or not self.only_sliced(callee, params[0].name, elements, n, outer + ((instr, comp),)):
                    return False
            elif instr.opcode in _ELEMENT_PRESERVING or instr.opcode in _ELEMENTWISE:
                if sum(a.elements for a in instr.shape) != elements:
                    return False
                if not self.only_sliced(comp, instr.name, elements, n, outer):
                    return False
            else:
                return False
        return True

    def sliced_bytes(self, comp: str, instr: Instruction, n: int) -> float:
        """Bytes of the arrays of all-reduce `instr` whose every use is a 1/n dynamic-slice."""
        if len(instr.shape) == 1 and not instr.opcode.endswith("-start"):
            a = instr.shape[0]
            return a.bytes if self.only_sliced(comp, instr.name, a.elements, n) else 0.0
        total = 0.0
        start = instr.opcode.endswith("-start")
        for user, _ in self.users(comp).get(instr.name, []):
            if start and user.opcode == "all-reduce-done":
                done = user
                if len(done.shape) == 1:
                    a = done.shape[0]
                    total += a.bytes if self.only_sliced(comp, done.name, a.elements, n) else 0.0
                else:
                    total += self.sliced_bytes(comp, dataclasses.replace(done, opcode="all-reduce"), n)
            elif user.opcode == "get-tuple-element":
                a = user.shape[0]
                total += a.bytes if self.only_sliced(comp, user.name, a.elements, n) else 0.0
        return total

    def operand_shape(self, comp: str, instr: Instruction, i: int) -> tuple[Array, ...]:
        if comp not in self._shapes:
            self._shapes[comp] = self.m.shapes(comp)
        return self._shapes[comp][instr.operands[i]]

    def reducer_flops(self, instr: Instruction, key: str = "to_apply") -> float:
        names = instr.called(key)
        return sum(self.cost(n)["flops"] for n in names)

    def instr_cost(self, comp: str, instr: Instruction) -> dict[str, float]:
        op = instr.opcode
        out = sum(a.elements for a in instr.shape)
        if op == "dot":
            lhs = self.operand_shape(comp, instr, 0)[0]
            dims = instr.attr("lhs_contracting_dims")
            contracted = math.prod(lhs.dims[int(d)] for d in re.findall(r"\d+", dims or ""))
            return {"flops": 2.0 * out * contracted, "dot_flops": 2.0 * out * contracted}
        if op == "convolution":
            # 2 FLOPs per multiply-add: output elements x kernel elements per output feature
            # (exact for the unpadded, undilated convolutions XLA makes of dots).
            rhs = self.operand_shape(comp, instr, 1)[0]
            labels = (instr.attr("dim_labels") or "").split("_")
            o = labels[1].index("o") if len(labels) > 1 and "o" in labels[1] else len(rhs.dims) - 1
            flops = 2.0 * out * rhs.elements / rhs.dims[o]
            return {"flops": flops, "dot_flops": flops}
        if op in _TRANSCENDENTAL:
            return {"transcendentals": float(out)}
        if op in _ELEMENTWISE:
            return {"flops": float(out)}
        if op == "reduce":
            reduced = self.operand_shape(comp, instr, 0)[0].elements - instr.shape[0].elements
            return {"flops": reduced * self.reducer_flops(instr)}
        if op == "map":
            return {"flops": out * self.reducer_flops(instr)}
        if op == "scatter":
            updates = self.operand_shape(comp, instr, len(instr.operands) - 1)[0].elements
            return {"flops": updates * self.reducer_flops(instr)}
        if op == "reduce-window":
            window = instr.attr("window") or ""
            size = re.search(r"size=([\dx]+)", window)
            k = math.prod(int(s) for s in size.group(1).split("x")) if size else 1
            return {"flops": (k - 1) * instr.shape[0].elements * self.reducer_flops(instr)}
        if op in ("all-reduce", "all-reduce-start"):
            return {"flops": float(out)}  # HloCostAnalysis: one add per element
        return {}

    def cost(self, comp: str) -> dict[str, float]:
        """{"flops", "dot_flops", "transcendentals"} of one execution of computation `comp`."""
        if comp in self._cost:
            return self._cost[comp]
        total = {"flops": 0.0, "dot_flops": 0.0, "transcendentals": 0.0}
        for instr in self.m.computations[comp]:
            part = dict(self.instr_cost(comp, instr))
            if instr.opcode in _CALLERS:
                if instr.opcode == "while":
                    n = trip_count(instr) if self.use_trip_counts else 1
                    subs = [self.cost(c) for c in instr.called("body") + instr.called("condition")]
                    sub = {k: n * sum(s[k] for s in subs) for k in total}
                elif instr.opcode == "conditional":
                    branch_costs = [self.cost(c) for c in _branches(instr)]  # the dearest branch
                    sub = max(branch_costs, key=lambda c: c["flops"]) if branch_costs else {}
                else:
                    names = instr.called("calls") or instr.called("to_apply") or instr.called("called_computations")
                    sub = {k: sum(self.cost(c)[k] for c in names) for k in total}
                for k, v in sub.items():
                    part[k] = part.get(k, 0.0) + v
            for k, v in part.items():
                total[k] += v
        self._cost[comp] = total
        return total

    def collectives(self, comp: str, count: int = 1) -> list[Collective]:
        out = []
        for instr in self.m.computations[comp]:
            kind = _collective_kind(instr.opcode)
            if kind is not None:
                n = 1 if kind == "collective-permute" else group_size(instr, self.m)
                sliced = self.sliced_bytes(comp, instr, n) if kind == "all-reduce" and n > 1 else 0.0
                out.append(Collective(
                    kind, instr.name, comp, _full_bytes(kind, instr, n), n, count,
                    tuple(sorted({a.dtype for a in instr.shape})), sliced, _op_name(instr),
                ))
            if instr.opcode == "while":
                n = trip_count(instr) if self.use_trip_counts else 1
                for c in instr.called("body") + instr.called("condition"):
                    out += self.collectives(c, count * n)
            elif instr.opcode == "conditional":
                for c in _branches(instr):  # every branch, as if each ran: an upper bound
                    out += self.collectives(c, count)
            elif instr.opcode in _CALLERS:
                for key in ("calls", "to_apply", "called_computations"):
                    for c in instr.called(key):
                        out += self.collectives(c, count)
        return out


def hlo_cost(text_or_module: str | HloModule, *, use_trip_counts: bool = True) -> dict[str, float]:
    """FLOPs of one execution of an HLO module: {"flops", "dot_flops", "transcendentals"}.

    `flops` follows XLA's HloCostAnalysis rules (what `compiled.cost_analysis()["flops"]` reports)
    except that a while loop's body counts `known_trip_count` times; `dot_flops` counts dots and
    convolutions only (2 per multiply-add), the part an analytic 6N-style count describes. With
    `use_trip_counts=False` each loop body counts once, as XLA's own cost analysis does. For a
    program compiled for several devices this is the cost per device. A custom call (cuDNN
    attention on GPU, say) counts nothing: its work is not in the HLO.
    """
    module = parse_hlo(text_or_module) if isinstance(text_or_module, str) else text_or_module
    return dict(_Walker(module, use_trip_counts).cost(module.entry))


def hlo_collectives(text_or_module: str | HloModule, *, use_trip_counts: bool = True) -> list[Collective]:
    """Every collective of an HLO module, with its group size and executions per step.

    Async pairs count once (the `-start` op; `-done` carries no data of its own), collectives inside
    while bodies count `known_trip_count` times, and `async-start` wrappers are followed into the
    computation that holds the collective.
    """
    module = parse_hlo(text_or_module) if isinstance(text_or_module, str) else text_or_module
    return _Walker(module, use_trip_counts).collectives(module.entry)


def collective_bytes(collectives: list[Collective], *, slices_as_reduce_scatter: bool = False) -> dict[str, float]:
    """Bytes sent per device per step for each collective kind (ring convention; zeros included).

    With `slices_as_reduce_scatter`, the part of an all-reduce that every use only dynamic-slices
    to its 1/n shard counts as the reduce-scatter it stands for (`Collective.sliced_bytes`).
    """
    out = {k: 0.0 for k in COLLECTIVE_KINDS}
    for c in collectives:
        for kind, b in c.bytes_by_kind(slices_as_reduce_scatter).items():
            out[kind] += b
    return out
