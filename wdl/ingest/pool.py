"""The process pool of preparation, generation and import: jobs in order, memory bounded."""

from __future__ import annotations

import collections
from concurrent.futures import ProcessPoolExecutor


def ordered_map(job, items, workers: int, initializer, initarg):
    """`job(item)` for each item, results in input order. With workers > 1 a process pool runs
    the jobs with at most 2 items per worker in flight, so reading ahead never outgrows memory
    (Pool.imap would consume the whole input iterator at once)."""
    if workers <= 1:
        initializer(initarg)
        for item in items:
            yield job(item)
        return
    with ProcessPoolExecutor(workers, initializer=initializer, initargs=(initarg,)) as pool:
        pending = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(job, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
