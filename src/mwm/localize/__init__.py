"""Stage 1 of Mask What Matters: text prompt → region per image (VLM + M2IB + postprocessing)."""
