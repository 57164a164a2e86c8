"""The scoring guidelines a HER2 IHC call is made under: breast or gastro-oesophageal, resection or biopsy.

One definition of what differs between the tumours' own guidelines, used by the scorer (which
membrane patterns count as "complete") and by the slide rule (the percentage cut, or the cluster
rule of small gastric samples). Torch-free, like :mod:`wsi_her2.vocab`.

**Breast** (``breast``, the default): ASCO/CAP 2018 (Wolff et al., J Clin Oncol 2018;36:2105),
reaffirmed 2023 with the HER2-low / ultralow wording. Percentages of invasive tumour cells,
strictly above 10 %: 3+ complete, circumferential, intense; 2+ weak to moderate complete; 1+
incomplete faint / barely perceptible; 0 none, or faint incomplete in <= 10 %. The 2018 update's
"unusual pattern": moderate to intense but incomplete (basolateral or lateral) staining in
> 10 % of cells, as in micropapillary carcinoma, is IHC 2+ (equivocal: reflex ISH), never 3+.

**Gastric / gastro-oesophageal junction adenocarcinoma** (``gastric``): CAP/ASCP/ASCO 2016
(Bartley et al., J Clin Oncol 2017;35:446), after Hofmann et al. (Histopathology 2008;52:797)
and Rüschoff et al. (Virchows Arch 2010;457:299). Glandular cells rarely stain on their luminal
side, so **complete, basolateral or lateral** membrane staining counts alike for 2+ and 3+.
Resections: at least 10 % of tumour cells (">= 10 %"). Biopsies and small samples (a TMA core
is one): a **cluster of >= 5 cohesive tumour cells** with the pattern decides, whatever the
percentage; 0 when no tumour cell stains.
"""
from __future__ import annotations

from dataclasses import dataclass

from wsi_her2.errors import ConfigError

__all__ = [
    "CRITERIA", "Criteria", "DEFAULT_CRITERIA", "DEFAULT_SPECIMEN", "SPECIMENS", "ScoringRule",
    "get_criteria", "scoring_rule",
]

#: How a sample is scored under the gastric guideline: by percentage (resection) or by clusters (biopsy, TMA core).
SPECIMENS = ("resection", "biopsy")
DEFAULT_SPECIMEN = "resection"


@dataclass(frozen=True)
class Criteria:
    """What one guideline says, as the scorer and the slide rule need it.

    ``incomplete_rings_count``: basolateral and lateral rings count as complete for 2+ and 3+
    (gastric). ``unusual_pattern_2plus``: moderate-to-intense basolateral or lateral rings make a
    cell 2+ but never 3+ (breast, ASCO/CAP 2018). ``inclusive_cut``: a grade needs ">= cut" of
    tumour cells (gastric) rather than "> cut" (breast). ``cluster_rule``: biopsies are scored
    by clusters of ``cluster_min_cells`` cohesive cells (gastric). ``categories``: the category
    key of each score, for :data:`CATEGORY_TEXT`.
    """

    name: str
    title: str
    reference: str
    incomplete_rings_count: bool
    unusual_pattern_2plus: bool
    inclusive_cut: bool
    cluster_rule: bool
    cell_fraction_cut: float = 0.10
    cluster_min_cells: int = 5
    categories: tuple[tuple[str, str], ...] = ()

    def category_of(self, score: str) -> str | None:
        return dict(self.categories).get(score)


CRITERIA: dict[str, Criteria] = {
    "breast": Criteria(
        name="breast", title="ASCO/CAP 2018 breast (2023 HER2-low/ultralow update)",
        reference="Wolff et al., J Clin Oncol 2018;36:2105-2122; ASCO/CAP 2023 update (J Clin Oncol 2023;41:3867)",
        incomplete_rings_count=False, unusual_pattern_2plus=True, inclusive_cut=False, cluster_rule=False,
        categories=(("1+", "low"), ("2+", "equivocal"), ("3+", "positive")),
    ),
    "gastric": Criteria(
        name="gastric", title="CAP/ASCP/ASCO 2016 gastroesophageal adenocarcinoma (Hofmann 2008, Rüschoff 2010)",
        reference="Bartley et al., J Clin Oncol 2017;35:446-464; Hofmann et al., Histopathology 2008;52:797-805; "
                  "Rüschoff et al., Virchows Arch 2010;457:299-307",
        incomplete_rings_count=True, unusual_pattern_2plus=False, inclusive_cut=True, cluster_rule=True,
        categories=(("0", "negative"), ("1+", "negative"), ("2+", "gastric_equivocal"), ("3+", "gastric_positive")),
    ),
}
DEFAULT_CRITERIA = "breast"


def get_criteria(name: str) -> Criteria:
    """The :class:`Criteria` called ``name`` (a one-line error listing the choices otherwise)."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise ConfigError(f"--criteria {name!r}: choose one of {', '.join(CRITERIA)}") from None


@dataclass(frozen=True)
class ScoringRule:
    """The guideline and specimen a call is made under (recorded with every call)."""

    criteria: Criteria
    specimen: str = DEFAULT_SPECIMEN

    @property
    def uses_clusters(self) -> bool:
        """Whether a cluster of cohesive stained cells decides (gastric biopsies and TMA cores)."""
        return self.criteria.cluster_rule and self.specimen == "biopsy"

    def describe(self) -> str:
        """One line for tables and the QuPath annotation, e.g. ``gastric, biopsy (cluster of >= 5 cells)``."""
        if self.uses_clusters:
            how = f"cluster of >= {self.criteria.cluster_min_cells} cohesive cells"
        else:
            op = ">=" if self.criteria.inclusive_cut else ">"
            how = f"{op} {self.criteria.cell_fraction_cut:.0%} of tumour cells"
        return f"{self.criteria.name}, {self.specimen} ({how})"

    def to_dict(self) -> dict:
        return {"criteria": self.criteria.name, "title": self.criteria.title, "reference": self.criteria.reference,
                "specimen": self.specimen, "rule": self.describe()}


def scoring_rule(criteria: str = DEFAULT_CRITERIA, specimen: str | None = None, *, tma: bool = False) -> ScoringRule:
    """The rule for ``--criteria`` / ``--specimen``; TMA cores are small samples (biopsy) unless told otherwise."""
    if specimen is None:
        specimen = "biopsy" if tma else DEFAULT_SPECIMEN
    if specimen not in SPECIMENS:
        raise ConfigError(f"--specimen {specimen!r}: choose one of {', '.join(SPECIMENS)}")
    return ScoringRule(get_criteria(criteria), specimen)
