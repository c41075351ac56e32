"""cappy_core.generation.sampling_spec: one SamplingSpec for `cappy sample` and `cappy sweep`, whose
"key" fields define the candidates and whose others only spread the work."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cappy_core.config import SettingError, key_values
from cappy_core.generation import PAPER_DECODING_NAMES, SamplingSpec, candidates_per_instruction, decodings_from_names


def test_the_default_is_the_papers_17_candidates_and_its_key_is_what_defines_them():
    spec = SamplingSpec()
    assert spec.decodings == list(PAPER_DECODING_NAMES)
    assert candidates_per_instruction(decodings_from_names(spec.decodings, spec.samples_per_decoding)) == 17
    assert set(key_values(spec)) == {"decodings", "samples_per_decoding", "max_new_tokens", "min_new_tokens", "seed",
                                     "prompt_format"}
    assert spec.prompt_format == "plain"  # the paper's: the instruction as it is


@pytest.mark.parametrize("changes, setting", [
    ({"decodings": ["beam4", "nucleus"]}, "decodings"), ({"samples_per_decoding": 0}, "samples_per_decoding"),
    ({"max_new_tokens": 2, "min_new_tokens": 3}, "min_new_tokens"), ({"num_actors": 0}, "num_actors"),
    ({"batch_rows": 0}, "batch_rows"), ({"cpus_per_actor": 0.0}, "cpus_per_actor"),
    ({"prompt_format": "chatml"}, "prompt_format")])
def test_settings_that_cannot_sample_are_refused_by_name(changes, setting):
    with pytest.raises(SettingError) as e:
        replace(SamplingSpec(), **changes)
    assert e.value.setting == setting


def test_the_sweep_and_the_sampler_embed_the_same_spec():
    from jobs.sample_label import SampleConfig
    from jobs.sweep_config import SweepConfig

    spec = SamplingSpec(seed=3, num_actors=2)
    assert SweepConfig(sampling=spec).sampling is spec and SampleConfig(sampling=spec).sampling is spec
    # a sampling seed changes the sampler's output key; its actor count does not
    base = key_values(SampleConfig(sampling=spec), flat_sections=True)
    assert key_values(SampleConfig(sampling=replace(spec, num_actors=4)), flat_sections=True) == base
    assert key_values(SampleConfig(sampling=replace(spec, seed=4)), flat_sections=True) != base
