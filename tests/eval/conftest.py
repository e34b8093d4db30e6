from lm_fixtures import lm_heldout, lm_model, lm_model_dir, lm_texts, lm_tokenizer  # noqa: F401
