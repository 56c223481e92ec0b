"""Where a run's time goes: programs XLA compiled and seconds per phase and per step, prompts
dropped and peak host memory, as a table printed at the end of a run (and kept in its workdir).

Compiles are counted with JAX's own monitoring: every XLA compilation (a new program; a hit in
jit's in-memory cache compiles nothing) records the duration event
`/jax/core/compile/backend_compile_duration` (jax._src.dispatch.BACKEND_COMPILE_EVENT, around
pxla's `_cached_compilation`), which a listener registered with
`jax.monitoring.register_event_duration_secs_listener` receives with the program's name.

Phases are windows of time the caller marks (`phase`, or `windows` for consecutive phases
timed elsewhere); a compile belongs to the window it ends in, "other" when none. Steps are
windows too (`step`): the programs compiled during each step show whether the count stops
growing once every bucket has been seen.
"""

from __future__ import annotations

import contextlib
import resource
import time

import jax

EVENT = "/jax/core/compile/backend_compile_duration"
OTHER = "other"  # compiles outside every marked phase


def peak_host_memory_gb() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Profile:
    """Compiles (time, seconds, program name), phase windows and step windows of one run."""

    def __init__(self):
        self.start = time.perf_counter()
        self.compiles: list[tuple[float, float, str]] = []
        self.phases: list[tuple[str, float, float]] = []  # (name, start, end), disjoint
        self.peaks: dict[str, float] = {}  # phase -> peak host memory (GB) at the end of its windows
        self.steps: list[tuple[str, float, float]] = []  # (label, start, end)
        self._taken = 0  # compiles already reported by take_compile_s
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == EVENT:
            self.compiles.append((time.perf_counter(), duration, str(kwargs.get("fun_name", "?"))))

    @contextlib.contextmanager
    def phase(self, name: str):
        """Marks the enclosed block as phase `name` (phases must not nest)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, start, time.perf_counter()))
            self.peaks[name] = peak_host_memory_gb()

    def windows(self, start: float, seconds: dict[str, float]) -> None:
        """Consecutive phases timed elsewhere: {name_s: seconds} in the order they ran from
        `start` (e.g. Experience.times); each name loses its "_s"."""
        peak = peak_host_memory_gb()  # the peak by the end of the last: a bound for each
        for key, s in seconds.items():
            self.phases.append((key.removesuffix("_s"), start, start + s))
            self.peaks[key.removesuffix("_s")] = peak
            start += s

    def step(self, label: str, start: float) -> None:
        """Marks step `label`, from `start` (time.perf_counter) until now."""
        self.steps.append((label, start, time.perf_counter()))

    def take_compile_s(self) -> float:
        """Seconds spent compiling since the last call (a step's compile_s metric)."""
        new = self.compiles[self._taken :]
        self._taken = len(self.compiles)
        return sum(d for _, d, _ in new)

    def _phase_of(self, t: float) -> str:
        for name, start, end in reversed(self.phases):
            if start <= t <= end:
                return name
        return OTHER

    def summary(self, dropped: dict[str, int]) -> dict:
        """Plain numbers: per phase {seconds, programs, compile_s}, per step {label, programs,
        by_phase}, totals, peak host memory (ru_maxrss), prompts dropped per split."""
        phases: dict[str, dict] = {}
        for name, start, end in self.phases:
            p = phases.setdefault(name, {"seconds": 0.0, "programs": 0, "compile_s": 0.0})
            p["seconds"] += end - start
            p["peak_gb"] = self.peaks.get(name, 0.0)
        for t, d, _ in self.compiles:
            p = phases.setdefault(self._phase_of(t), {"seconds": 0.0, "programs": 0, "compile_s": 0.0})
            p["programs"] += 1
            p["compile_s"] += d
        wall = time.perf_counter() - self.start
        other = phases.setdefault(OTHER, {"seconds": 0.0, "programs": 0, "compile_s": 0.0})
        other["seconds"] = wall - sum(end - start for _, start, end in self.phases)  # unmarked time
        steps = []
        for label, start, end in self.steps:
            by_phase: dict[str, int] = {}
            names = []  # phase/program of each compile, to see what a late one was
            for t, _, fun in self.compiles:
                if start <= t <= end:
                    name = self._phase_of(t)
                    by_phase[name] = by_phase.get(name, 0) + 1
                    names.append(f"{name}/{fun}")
            steps.append({"step": label, "programs": len(names), "by_phase": by_phase, "names": names})
        return {
            "wall_s": wall,
            "programs": len(self.compiles),
            "compile_s": sum(d for _, d, _ in self.compiles),
            "peak_host_memory_gb": peak_host_memory_gb(),
            "prompts_dropped": dict(dropped),
            "phases": phases,
            "steps": steps,
        }

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


def table(s: dict) -> str:
    """`Profile.summary`'s numbers as the text table the run prints."""
    lines = [
        f"profile: wall {s['wall_s']:.1f} s, {s['programs']} programs compiled in {s['compile_s']:.1f} s, "
        f"peak host memory {s['peak_host_memory_gb']:.2f} GB (ru_maxrss)",
        f"{'phase':<16}{'seconds':>10}{'programs':>10}{'compile_s':>11}{'peak_GB':>9}",
    ]
    for name, p in s["phases"].items():
        peak = f"{p['peak_gb']:>9.2f}" if "peak_gb" in p else ""
        lines.append(f"{name:<16}{p['seconds']:>10.1f}{p['programs']:>10d}{p['compile_s']:>11.1f}{peak}")
    lines.append("programs compiled per step (by phase):")
    for st in s["steps"]:
        detail = ", ".join(f"{k} {v}" for k, v in st["by_phase"].items())
        lines.append(f"  {st['step']:<16}{st['programs']:>4d}" + (f"  ({detail})" if detail else ""))
    dropped = ", ".join(f"{split} {n}" for split, n in s["prompts_dropped"].items()) or "none"
    lines.append(f"prompts dropped (over rl.max_prompt_len): {dropped}")
    return "\n".join(lines)
