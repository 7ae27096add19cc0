"""Interpreter settings for a process that serves requests, applied once its app has started.

- The objects that exist by then (modules, FHIR models, the app and its services: ~420,000)
  live as long as the process: `gc.freeze()` moves them out of the collector's generations.
  Full collections traversed all of them: 420 ms pauses, twice per 5,000 FHIR reads, which set
  the fhir-read p99.
- The GIL switch interval goes from 5 ms to 0.5 ms. Database reads and password hashing run on
  worker threads; a thread that wants the GIL back waits up to one interval, and the event
  loop waits behind them for every read it hands off: fhir-read with cold data keys went
  from 414 to 531 requests/s and its p99 from 635 to 102 ms (bench/README.md).
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL_SECONDS = 0.0005

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
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
