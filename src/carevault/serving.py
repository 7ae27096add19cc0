"""Interpreter settings for a process that serves requests, applied once its app has started.

- The objects that exist by then (modules, FHIR models, the app and its services: ~420,000)
  live as long as the process: `gc.freeze()` moves them out of the collector's generations.
  Full collections traversed all of them: 420 ms pauses, twice per 5,000 FHIR reads, which set
  the fhir-read p99.
- The youngest generation is collected after 10,000 net new container objects instead of 700.
  With 32 requests in flight, a collection every 700 promoted the objects of the requests under
  way, and the oldest generation then filled often enough for a full collection every ~0.6 s.
  A full collection traverses what the process has cached since start-up (a data key and the
  access facts per patient read: ~87,000 objects after 10,000 patients) and took 60-150 ms.
  SQLite, 1 worker, 10,000 patients, fhir-read for 10 s: ~1.2 s of collections per run and a
  p99 of 82-121 ms before; 0 or 1 young collections per run and a p99 of 35-42 ms after.
  Requests free almost everything they allocate by reference counting, so the young
  generation rarely reaches 10,000; such a collection took at most 8 ms.
- The GIL switch interval goes from 5 ms to 0.5 ms. Database reads and password hashing run on
  worker threads; a thread that wants the GIL back waits up to one interval, and the event
  loop waits behind them for every read it hands off: fhir-read with cold data keys went
  from 414 to 531 requests/s and its p99 from 635 to 102 ms (bench/README.md).
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL_SECONDS = 0.0005
YOUNG_GENERATION_THRESHOLD = 10_000

_applied = False


def tune_for_serving() -> None:
    """Apply the settings above, once per process (every app started later in the same
    process, as in the test suite, finds them in place)."""
    global _applied
    if _applied:
        return
    _applied = True
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
