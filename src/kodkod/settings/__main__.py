"""`python -m kodkod.settings` prints the generated sample config (config_sample.yml)."""

import sys

from kodkod.settings.sample import render_sample_config

sys.stdout.write(render_sample_config())
