"""The DIDR paper's toy experiment (METHOD.md section 4): the embedded default main job."""
