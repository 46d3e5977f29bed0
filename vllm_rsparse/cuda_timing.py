"""GPU time of a piece of work as vLLM's decode runs it: captured once in a CUDA graph and
replayed, so no CPU launch cost is counted. Shared by the benchmark scripts."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 7) -> float:
    """Median milliseconds of one replay of a captured graph (after one untimed replay)."""
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_replay_ms(work: Callable[[], object], replays: int = 7) -> float:
    """Median milliseconds of one replay of a CUDA graph of `work`. `work` runs once
    uncaptured first, so compilation and allocation stay out of the graph."""
    work()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return replay_ms(graph, replays)
