"""kiln.infer: a trained model at work. Loading any checkpoint as one model (load), the shared
held-out evaluation (evaluate), KV-cached generation (generate, kv_cache), and ExpertFlow's
offloaded experts with a routing predictor and a token scheduler (expertflow/)."""
