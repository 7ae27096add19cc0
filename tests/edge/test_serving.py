"""A started app leaves its process tuned for serving (carevault/serving.py)."""

from __future__ import annotations

import gc
import sys

from carevault.app import create_app
from carevault.config import Settings
from carevault.serving import SWITCH_INTERVAL_SECONDS, YOUNG_GENERATION_THRESHOLD


async def test_a_started_app_freezes_its_objects_and_tunes_the_collector_and_switch_interval(
    settings: Settings,
) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        # What exists after start-up is out of the collector's generations: a full
        # collection no longer traverses the app, its services and the loaded models.
        assert gc.get_freeze_count() > 100_000
        assert sys.getswitchinterval() == SWITCH_INTERVAL_SECONDS
        # Requests under way are no longer promoted every 700 allocations, which filled the
        # oldest generation and brought full collections of everything cached since start.
        assert gc.get_threshold()[0] == YOUNG_GENERATION_THRESHOLD
