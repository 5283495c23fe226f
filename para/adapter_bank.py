"""Thousands of tenants on one model: a catalog of adapter names and a bank of a few slots in
the model that holds the adapters in use, filled on demand, least recently used out first.

The names are those given at start (`--adapter NAME=PATH`), those loaded at run time, and every
adapter in a folder (a file's stem, or a PEFT folder's name), looked up at each request so a
file added while serving is served. An HTTP thread reads and checks the file (`read`) before
its request is queued: a bad file is that request's 4xx, and the decoding thread never waits
on a disk. Between two decoding steps the scheduler puts an adapter already in memory into a
slot (`place`), a copy of a few MB.

A row pins its slot while it may read it. A PARA row reads its slot only while its prompt is
prefilled: its vectors are then in the cache and the row moves to slot 0 (`release`), so a
PARA slot is free again once the prompt is read. A LoRA or (IA)^3 row reads its slot at every
step and holds it until it leaves.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from para.adapter_files import SAFETENSORS, AdapterError, read_for
from para.adapters import AdapterConfig, bank_layout, load_slot, make_bank, misfit
from para.errors import UserError
from para.model import Transformer
from para.peft_format import CONFIG as PEFT_CONFIG
from para.prometheus import Metrics

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")   # a model name that is also a safe file name
SUFFIXES = (".pt", SAFETENSORS)


class UnknownAdapter(UserError):
    """A model name that names no adapter."""


@dataclass(frozen=True)
class Adapter:
    """One adapter read into memory, ready for a slot."""
    name: str
    key: tuple                     # (path, modification time): a changed file is another adapter
    config: AdapterConfig
    state: dict[str, torch.Tensor]


class AdapterBank:
    def __init__(self, model: Transformer, slots: int, named: dict[str, Path], folder: Path | None = None,
                 max_rank: int | None = None, metrics: Metrics | None = None):
        """`slots` places for adapters (slot 0, the base model, is extra); reads, loads and
        evictions are counted in `metrics`."""
        self.model, self.folder, self.metrics = model, folder, metrics or Metrics()
        self.named = {name: Path(path).resolve() for name, path in named.items()}   # --adapter and run-time loads
        self.lock = threading.Lock()   # guards `named` (HTTP threads add and remove names)
        for name in self.named:
            check_name(name)
        if folder is not None and not folder.is_dir():
            raise UserError(f"--adapter-dir {folder}: not a folder")
        self.layout: list[AdapterConfig] | None = None   # what the bank can hold, once made
        self.keys: list[tuple | None] = []                 # what each slot holds
        self.resident: dict[tuple, Adapter] = {}           # the adapters in slots, by key: no second read
        configs, start = [], []   # every adapter's config; the first `slots` adapters, to fill the slots
        for name in [*self.named, *self.folder_names()]:
            adapter = self.read(name) if name in self.named else self.read_or_warn(name)   # bad and named: stop
            if adapter is not None:
                configs.append(adapter.config)
                start += [adapter][:slots - len(start)]
        configs = configs or [AdapterConfig("para", max_rank or AdapterConfig.rank)]
        if max_rank:   # room for larger adapters added later
            configs += [AdapterConfig(c.method, max(c.rank, max_rank), pool=c.pool, targets=c.targets)
                        for c in configs if c.method != "ia3"]
        self.layout = bank_layout(model, configs)
        make_bank(model, self.layout, slots + 1)
        self.keys = [None] * (slots + 1)
        self.last_used = [0.0] * (slots + 1)
        self.pins = [0] * (slots + 1)                      # rows that may read each slot
        for adapter in start:
            self.release(self.place(adapter))

    def folder_names(self) -> list[str]:
        if self.folder is None:
            return []
        names = {path.stem if path.is_file() else path.name for path in self.folder.iterdir()
                 if NAME.fullmatch(path.name) and (path.suffix in SUFFIXES and path.is_file()
                                                   or (path / PEFT_CONFIG).is_file())}
        return sorted(names)

    def names(self) -> list[str]:
        """Every name served: "base", those named at start or loaded at run time, then the folder's."""
        with self.lock:
            named = list(self.named)
        return ["base", *named, *(n for n in self.folder_names() if n not in named)]

    def path_of(self, name: str) -> Path:
        with self.lock:
            if name in self.named:
                return self.named[name]
        if self.folder is not None and NAME.fullmatch(name):
            found = [p for p in (self.folder / (name + s) for s in SUFFIXES) if p.is_file()]
            found += [p for p in [self.folder / name] if (p / PEFT_CONFIG).is_file()]
            if len(found) > 1:
                raise AdapterError(f"{self.folder}: {' and '.join(p.name for p in found)} both name {name!r}; "
                                   "keep one")
            if found:
                return found[0].resolve()
        raise UnknownAdapter(f"model {name!r} is not served here; GET /v1/models lists them")

    def knows(self, name: str) -> bool:
        try:
            return bool(self.path_of(name))
        except UserError:
            return False

    def read(self, name: str) -> Adapter:
        """The adapter `name`, read and checked against the model and the bank (an HTTP thread
        calls this). A file is read again only when it changed or left the bank's slots and
        read_for's cache; a PEFT folder, whenever it is not in a slot."""
        return self._read(name, self.path_of(name))

    def read_or_warn(self, name: str) -> Adapter | None:
        try:
            return self.read(name)
        except UserError as e:
            print(f"warning: {e}", file=sys.stderr)
            return None

    def add(self, name: str, path: Path) -> Adapter:
        """Serve `path` as `name` from now on (a run-time load); it is read and checked first."""
        check_name(name)
        if name in self.names():
            raise UserError(f"the name {name!r} is taken; unload it first")
        adapter = self._read(name, Path(path).resolve())
        with self.lock:
            self.named[name] = adapter.key[0]
        return adapter

    def _read(self, name: str, path: Path) -> Adapter:
        key = (path, modified(path))
        resident = self.resident.get(key)
        if resident is not None:   # in a slot already, and the file has not changed since
            return resident
        start = time.perf_counter()
        config, state = read_for(self.model, path)
        reason = self.layout and misfit(self.model, self.layout, config)
        if reason:
            raise AdapterError(f"{path}: does not fit the bank serve.py made at start ({reason}); restart it "
                               "with this adapter in --adapter-dir, or with a larger --max-rank")
        self.metrics.observe("para_adapter_read_seconds", time.perf_counter() - start)
        return Adapter(name, key, config, state)

    def remove(self, name: str) -> None:
        """Stop serving `name` (loaded at start or run time); rows already decoding finish."""
        with self.lock:
            if name not in self.named:
                raise UnknownAdapter(f"{name!r} was not loaded by name (a file in --adapter-dir is removed by "
                                     "deleting it)" if name in self.folder_names() else f"{name!r} is not loaded")
            del self.named[name]

    # The scheduler thread alone calls the methods below.

    def place(self, adapter: Adapter) -> int | None:
        """The slot holding `adapter`, now pinned for one more row: where it already is, else a
        free slot or the least recently used unpinned one, loaded with it; None when every
        slot is pinned (the row waits for one)."""
        now = time.perf_counter()
        if adapter.key in self.keys:
            slot = self.keys.index(adapter.key)
        else:
            free = [s for s in range(1, len(self.keys)) if self.pins[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: (self.keys[s] is not None, self.last_used[s]))
            if self.keys[slot] is not None:
                self.metrics.count("para_adapter_evictions_total")
                del self.resident[self.keys[slot]]
                self.keys[slot] = None   # until the copy below is whole
            load_slot(self.model, slot, adapter.config, adapter.state)
            self.keys[slot], self.resident[adapter.key] = adapter.key, adapter
            self.metrics.count("para_adapter_loads_total")
        self.pins[slot] += 1
        self.last_used[slot] = now
        return slot

    def release(self, slot: int) -> None:
        """One row no longer reads `slot`."""
        if slot:
            self.pins[slot] -= 1


def modified(path: Path) -> int:
    """When the adapter at `path` last changed: its file's time, or the newest in a PEFT folder."""
    try:
        return max(p.stat().st_mtime_ns for p in (path.iterdir() if path.is_dir() else [path]))
    except (OSError, ValueError):   # gone, or an empty folder: read_for names the problem
        return 0


def check_name(name: str) -> None:
    if name == "base" or not NAME.fullmatch(name):
        raise UserError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' (not 'base')")
