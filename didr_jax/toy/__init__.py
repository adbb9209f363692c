"""The DIDR paper's toy experiment (docs/method.md section 5): the embedded default main job."""
