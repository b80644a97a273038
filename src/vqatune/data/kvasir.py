"""Facts about Kvasir-VQA (``SimulaMet-HOST/Kvasir-VQA``) that the synthetic set and the
metrics share, strings exactly as the dataset spells them (its typos included).
"""
from __future__ import annotations

COLUMNS = ("image", "source", "question", "answer", "img_id")
SOURCES = ("Normal", "Ulcerative Colitis", "Esophagitis", "Polyps", "Instrument")

Q_ABNORMALITY = "Are there any abnormalities in the image? Check all that are present."
Q_LANDMARK = "Are there any anatomical landmarks in the image? Check all that are present."
Q_INSTRUMENT = "Are there any instruments in the image? Check all that are present."
Q_ANY_FINDING = "Does this image contain any finding?"
Q_POLYPS_REMOVED = "Have all polyps been removed?"
Q_EASY = "Is this finding easy to detect?"
Q_BOX = "Is there a green/black box artefact?"
Q_TEXT = "Is there text?"
Q_POLYP_TYPE = "What type of polyp is present?"
Q_PROCEDURE = "What type of procedure is the image taken from?"
Q_SIZE = "What is the size of the polyp?"
Q_COLOR_ABNORMALITY = "What color is the abnormality? If more than one separate with ;"
Q_COLOR_LANDMARK = "What color is the anatomical landmark? If more than one separate with ;"
Q_WHERE_ABNORMALITY = "Where in the image is the abnormality?"
Q_WHERE_INSTRUMENT = "Where in the image is the instrument?"
Q_WHERE_LANDMARK = "Where in the image is the anatomical landmark?"
Q_COUNT_FINDINGS = "How many findings are present?"
Q_COUNT_POLYPS = "How many polyps are in the image?"
Q_COUNT_INSTRUMENTS = "How many instrumnets are in the image?"  # sic: the dataset's typo

# The 19 templates that carry answers (58,798 rows). The dataset has 20 raw strings; the
# 20th carries only the 51 literal "nan" answers, and our references do not spell it, so the
# synthetic set puts its "nan" rows on these templates instead.
QUESTIONS = (
    Q_ABNORMALITY, Q_LANDMARK, Q_INSTRUMENT, Q_ANY_FINDING, Q_POLYPS_REMOVED, Q_EASY, Q_BOX,
    Q_TEXT, Q_POLYP_TYPE, Q_PROCEDURE, Q_SIZE, Q_COLOR_ABNORMALITY, Q_COLOR_LANDMARK,
    Q_WHERE_ABNORMALITY, Q_WHERE_INSTRUMENT, Q_WHERE_LANDMARK, Q_COUNT_FINDINGS,
    Q_COUNT_POLYPS, Q_COUNT_INSTRUMENTS,
)

# Kvasir's own answer types (gauravparajuli/ImageCLEFmed-MEDVQA-GI-2025-Task1).
QUESTION_TYPE = {
    Q_ABNORMALITY: "multi", Q_LANDMARK: "multi", Q_INSTRUMENT: "multi",
    Q_ANY_FINDING: "yes/no", Q_POLYPS_REMOVED: "yes/no", Q_EASY: "yes/no", Q_BOX: "yes/no",
    Q_TEXT: "yes/no", Q_POLYP_TYPE: "single", Q_PROCEDURE: "single", Q_SIZE: "single",
    Q_COLOR_ABNORMALITY: "colour", Q_COLOR_LANDMARK: "colour",
    Q_WHERE_ABNORMALITY: "location", Q_WHERE_INSTRUMENT: "location", Q_WHERE_LANDMARK: "location",
    Q_COUNT_FINDINGS: "count", Q_COUNT_POLYPS: "count", Q_COUNT_INSTRUMENTS: "count",
}

GRID_CELLS = (
    "upper-left", "upper-center", "upper-right",
    "center-left", "center", "center-right",
    "lower-left", "lower-center", "lower-right",
)
COLOURS = ("pink", "red", "white", "yellow", "flesh", "brown", "orange", "grey", "black",
           "green", "blue", "purple")
ABNORMALITIES = ("polyp", "ulcerative colitis", "oesophagitis", "barretts",
                 "short-segment barretts", "hemorrhoids")
LANDMARKS = ("z-line", "cecum", "ileum", "pylorus")
INSTRUMENTS = ("tube", "biopsy forceps", "polyp snare", "metal clip", "injection needle")
POLYP_TYPES = ("paris is", "paris ip", "paris iia")
SIZES = ("<5mm", "5-10mm", "11-20mm", ">20mm")
PROCEDURES = ("colonoscopy", "gastroscopy", "capsule endoscopy")

# Answer vocabulary per template (single values; multi-answers join them with "; ").
ANSWER_VOCAB = {
    Q_ABNORMALITY: ABNORMALITIES,
    Q_LANDMARK: ("none",) + LANDMARKS,
    Q_INSTRUMENT: ("none",) + INSTRUMENTS,
    Q_ANY_FINDING: ("no", "yes"),
    Q_POLYPS_REMOVED: ("not relevant", "no", "yes"),
    Q_EASY: ("yes", "no", "not relevant"),
    Q_BOX: ("no", "yes"),
    Q_TEXT: ("yes", "no"),
    Q_POLYP_TYPE: ("none",) + POLYP_TYPES,
    Q_PROCEDURE: PROCEDURES,
    Q_SIZE: ("none",) + SIZES + (">20",),
    Q_COLOR_ABNORMALITY: COLOURS + ("none",),
    Q_COLOR_LANDMARK: ("pink", "red", "white", "yellow", "brown", "grey"),
    Q_WHERE_ABNORMALITY: GRID_CELLS + ("none",),
    Q_WHERE_INSTRUMENT: GRID_CELLS + ("none",),
    Q_WHERE_LANDMARK: GRID_CELLS + ("none", "lower-rigth"),
    Q_COUNT_FINDINGS: tuple(str(i) for i in range(1, 7)) + ("16",),
    Q_COUNT_POLYPS: tuple(str(i) for i in range(0, 7)) + ("16",),
    Q_COUNT_INSTRUMENTS: ("0", "1", "2", "3"),
}

# Known spelling errors in references, mapped before scoring (kvasir-vqa.md, quirk 3).
ANSWER_TYPOS = {"lower-rigth": "lower-right", ">20": ">20mm"}
