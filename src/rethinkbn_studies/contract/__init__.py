"""What a study is and what it hands back: the study contract and registry (``base``), verdicts
with their noise (``verdicts``), the paper's numbers (``paper``), report.md and results.json
(``report``)."""
