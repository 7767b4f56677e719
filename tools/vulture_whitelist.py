"""Names vulture cannot see being used, mentioned here so `make lint` (vulture) keeps quiet about
them: the public API (used by suites, not by the package itself), module protocol functions,
dataclass fields read through getattr, and attributes that other libraries read. pytest hooks
and fixtures are ignored by name and decorator in the Makefile. This file is read, never run."""
# ruff: noqa
_.__getattr__  # the package's lazy public names
_.__dir__
_.hit_cells  # LocalizationProfile: public profile API
_.source_index  # ResolvedProbe: the hf_reference tests read it
_.hit_rate  # PatchResult: public result API
_.capture  # Engine: one source state, for the evaluation's affine fits and for tests
_.maxstring  # reprlib.Repr settings (errors.shown)
_.maxother
_.maxlong
_.token_identity  # eval.LayerScores fields, read through getattr(self, method)
_.logit_lens
_.token_identity_surprisal
_.logit_lens_surprisal
_.affine_surprisal
_.PRESETS  # presets by name, for suites written as data
_.sites  # strategies: the Hypothesis strategies are public API
_.prompts_from_templates
_.identity_prompts
_.entity_facts
_.mappings
_.strengths
_.subject  # strategies' fact fields, drawn by users
_.answer
_._attn_implementation  # read by transformers
_.patchscope_device  # pytest's option namespace, read by workers.configure_worker
_.runtest  # fact_tables.FactItem: pytest calls these on a non-Python test item
_.reportinfo
