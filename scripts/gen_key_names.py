"""Write docs/key-names.md from llmtune.recipe.synonyms (other tools' key names and llmtune's)."""

from pathlib import Path

from llmtune.recipe.synonyms import SYNONYMS_DOC, render_doc

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / SYNONYMS_DOC
    out.write_text(render_doc(), encoding="utf-8")
    print(f"wrote {out}")
