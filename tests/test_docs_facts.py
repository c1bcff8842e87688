"""Numbers the docs state about the committed quick run come from its report (issue 22 item 8):
each is checked against the report's Setup paragraphs, so a new run that changes them fails here
until the page says the new numbers."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = (ROOT / "docs" / "results" / "quick" / "report.md").read_text()
PAGE = (ROOT / "docs" / "reproduction.md").read_text()


def setups() -> dict[str, str]:
    """study -> its Setup paragraph, up to where it describes the paper's own setup."""
    out = {}
    for section in re.split(r"^## `", REPORT, flags=re.M)[1:]:
        name = section.split("`", 1)[0]
        found = re.search(r"^\*\*Setup\.\*\*(.*)$", section, flags=re.M)
        assert found, f"{name}: no Setup paragraph"
        out[name] = found.group(1).split("The paper")[0]
    return out


def test_the_quick_epochs_the_docs_state_are_the_reports():
    epochs = [int(n) for text in setups().values()
              for n in re.findall(r"(?<![\d.])(\d+) epochs", text)]
    assert f"{min(epochs)} to {max(epochs)} epochs" in PAGE, (min(epochs), max(epochs))


def test_the_training_samples_the_docs_state_are_the_reports():
    stated = {"ema-vs-precise": "8,000", "precise-batch": "1,000", "nbs": "1,000",
              "domain-shift": "2,000", "multi-domain": "2,000"}
    for study, count in stated.items():
        assert f"{count.replace(',', '')} training" in setups()[study], study
        assert re.search(rf"{count} \([^)]*`{study}`", PAGE), study
