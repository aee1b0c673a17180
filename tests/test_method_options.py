"""Each merge method declares its options (`lorasum.methods.options.Option`); `MergeConfig` is
generic over them. The tables below were computed by the MergeConfig that had one field per
option (before the declarations, commit cb30ef8) and are data: `resolved()` is what the recipe
records and what the cache keys hash, so it must not change for any method or option given, and
the messages stay the same."""

from __future__ import annotations

import pytest

from lorasum.errors import LorasumError
from lorasum.methods import MergeConfig, MergeMethod, Option, get_method, method_names, registry
from lorasum.methods.options import DENSITY, RANK, at_least

NAN = float("nan")
INF = float("inf")

RESOLVED = [
    ("sum", {}, [("method", "sum"), ("pad_rank_to", None)]),
    ("sum", {"pad_rank_to": 64}, [("method", "sum"), ("pad_rank_to", 64)]),
    ("weighted", {}, [("method", "weighted"), ("pad_rank_to", None)]),
    ("weighted", {"pad_rank_to": 64}, [("method", "weighted"), ("pad_rank_to", 64)]),
    ("mean", {}, [("method", "mean"), ("pad_rank_to", None)]),
    ("mean", {"pad_rank_to": 64}, [("method", "mean"), ("pad_rank_to", 64)]),
    ("svd", {"rank": 4}, [("method", "svd"), ("rank", 4), ("pad_rank_to", None)]),
    ("svd", {"rank": 4, "pad_rank_to": 64}, [("method", "svd"), ("rank", 4), ("pad_rank_to", 64)]),
    (
        "svd",
        {"rank": "auto", "keep": 0.9},
        [("method", "svd"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("svd", {"rank": 3}, [("method", "svd"), ("rank", 3), ("pad_rank_to", None)]),
    (
        "svd",
        {"rank": "auto"},
        [("method", "svd"), ("keep", 0.99), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("svd", {"rank": "5"}, [("method", "svd"), ("rank", 5), ("pad_rank_to", None)]),
    (
        "svd",
        {"rank": "auto", "keep": 0.9, "pad_rank_to": 64},
        [("method", "svd"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", 64)],
    ),
    ("svd", {"rank": 6, "pad_rank_to": 64}, [("method", "svd"), ("rank", 6), ("pad_rank_to", 64)]),
    (
        "ties",
        {"density": 0.2},
        [
            ("method", "ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "ties",
        {"density": 0.2, "pad_rank_to": 64},
        [
            ("method", "ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", None),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "ties",
        {"density": 0.3},
        [
            ("method", "ties"),
            ("density", 0.3),
            ("majority_sign", "total"),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "ties",
        {"density": 0.2, "rank": "auto", "keep": 0.9},
        [
            ("method", "ties"),
            ("density", 0.2),
            ("keep", 0.9),
            ("majority_sign", "total"),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "ties",
        {"density": 0.2, "majority_sign": "frequency"},
        [
            ("method", "ties"),
            ("density", 0.2),
            ("majority_sign", "frequency"),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "ties",
        {"density": 0.2, "rank": 3},
        [
            ("method", "ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", 3),
            ("pad_rank_to", None),
        ],
    ),
    (
        "ties",
        {"density": 0.2, "rank": "auto"},
        [
            ("method", "ties"),
            ("density", 0.2),
            ("keep", 0.99),
            ("majority_sign", "total"),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "ties",
        {"density": 0.2, "rank": "5"},
        [
            ("method", "ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", 5),
            ("pad_rank_to", None),
        ],
    ),
    (
        "ties",
        {
            "density": 0.3,
            "majority_sign": "frequency",
            "keep": 0.9,
            "rank": "auto",
            "pad_rank_to": 64,
        },
        [
            ("method", "ties"),
            ("density", 0.3),
            ("keep", 0.9),
            ("majority_sign", "frequency"),
            ("rank", "auto"),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "ties",
        {"density": 0.3, "majority_sign": "frequency", "rank": 6, "pad_rank_to": 64},
        [
            ("method", "ties"),
            ("density", 0.3),
            ("majority_sign", "frequency"),
            ("rank", 6),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "magnitude_prune",
        {"density": 0.2},
        [("method", "magnitude_prune"), ("density", 0.2), ("rank", None), ("pad_rank_to", None)],
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "pad_rank_to": 64},
        [("method", "magnitude_prune"), ("density", 0.2), ("rank", None), ("pad_rank_to", 64)],
    ),
    (
        "magnitude_prune",
        {"density": 0.3},
        [("method", "magnitude_prune"), ("density", 0.3), ("rank", None), ("pad_rank_to", None)],
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "rank": "auto", "keep": 0.9},
        [
            ("method", "magnitude_prune"),
            ("density", 0.2),
            ("keep", 0.9),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "rank": 3},
        [("method", "magnitude_prune"), ("density", 0.2), ("rank", 3), ("pad_rank_to", None)],
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "rank": "auto"},
        [
            ("method", "magnitude_prune"),
            ("density", 0.2),
            ("keep", 0.99),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "rank": "5"},
        [("method", "magnitude_prune"), ("density", 0.2), ("rank", 5), ("pad_rank_to", None)],
    ),
    (
        "magnitude_prune",
        {"density": 0.3, "keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [
            ("method", "magnitude_prune"),
            ("density", 0.3),
            ("keep", 0.9),
            ("rank", "auto"),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "magnitude_prune",
        {"density": 0.3, "rank": 6, "pad_rank_to": 64},
        [("method", "magnitude_prune"), ("density", 0.3), ("rank", 6), ("pad_rank_to", 64)],
    ),
    (
        "dare_linear",
        {"density": 0.2},
        [
            ("method", "dare_linear"),
            ("density", 0.2),
            ("rank", None),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.2, "pad_rank_to": 64},
        [
            ("method", "dare_linear"),
            ("density", 0.2),
            ("rank", None),
            ("seed", 0),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.3},
        [
            ("method", "dare_linear"),
            ("density", 0.3),
            ("rank", None),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.2, "rank": "auto", "keep": 0.9},
        [
            ("method", "dare_linear"),
            ("density", 0.2),
            ("keep", 0.9),
            ("rank", "auto"),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.2, "rank": 3},
        [
            ("method", "dare_linear"),
            ("density", 0.2),
            ("rank", 3),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.2, "rank": "auto"},
        [
            ("method", "dare_linear"),
            ("density", 0.2),
            ("keep", 0.99),
            ("rank", "auto"),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.2, "rank": "5"},
        [
            ("method", "dare_linear"),
            ("density", 0.2),
            ("rank", 5),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.2, "seed": 7},
        [
            ("method", "dare_linear"),
            ("density", 0.2),
            ("rank", None),
            ("seed", 7),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.3, "seed": 7, "keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [
            ("method", "dare_linear"),
            ("density", 0.3),
            ("keep", 0.9),
            ("rank", "auto"),
            ("seed", 7),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "dare_linear",
        {"density": 0.3, "seed": 7, "rank": 6, "pad_rank_to": 64},
        [
            ("method", "dare_linear"),
            ("density", 0.3),
            ("rank", 6),
            ("seed", 7),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", None),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2, "pad_rank_to": 64},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", None),
            ("seed", 0),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.3},
        [
            ("method", "dare_ties"),
            ("density", 0.3),
            ("majority_sign", "total"),
            ("rank", None),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2, "rank": "auto", "keep": 0.9},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("keep", 0.9),
            ("majority_sign", "total"),
            ("rank", "auto"),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2, "majority_sign": "frequency"},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("majority_sign", "frequency"),
            ("rank", None),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2, "rank": 3},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", 3),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2, "rank": "auto"},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("keep", 0.99),
            ("majority_sign", "total"),
            ("rank", "auto"),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2, "rank": "5"},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", 5),
            ("seed", 0),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.2, "seed": 7},
        [
            ("method", "dare_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", None),
            ("seed", 7),
            ("pad_rank_to", None),
        ],
    ),
    (
        "dare_ties",
        {
            "density": 0.3,
            "majority_sign": "frequency",
            "keep": 0.9,
            "rank": "auto",
            "seed": 7,
            "pad_rank_to": 64,
        },
        [
            ("method", "dare_ties"),
            ("density", 0.3),
            ("keep", 0.9),
            ("majority_sign", "frequency"),
            ("rank", "auto"),
            ("seed", 7),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "dare_ties",
        {"density": 0.3, "majority_sign": "frequency", "rank": 6, "seed": 7, "pad_rank_to": 64},
        [
            ("method", "dare_ties"),
            ("density", 0.3),
            ("majority_sign", "frequency"),
            ("rank", 6),
            ("seed", 7),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "tsv",
        {},
        [
            ("method", "tsv"),
            ("method_scale", 1.0),
            ("rank", None),
            ("task_rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "tsv",
        {"pad_rank_to": 64},
        [
            ("method", "tsv"),
            ("method_scale", 1.0),
            ("rank", None),
            ("task_rank", None),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "tsv",
        {"rank": "auto", "keep": 0.9},
        [
            ("method", "tsv"),
            ("keep", 0.9),
            ("method_scale", 1.0),
            ("rank", "auto"),
            ("task_rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "tsv",
        {"method_scale": 0.5},
        [
            ("method", "tsv"),
            ("method_scale", 0.5),
            ("rank", None),
            ("task_rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "tsv",
        {"rank": 3},
        [
            ("method", "tsv"),
            ("method_scale", 1.0),
            ("rank", 3),
            ("task_rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "tsv",
        {"rank": "auto"},
        [
            ("method", "tsv"),
            ("keep", 0.99),
            ("method_scale", 1.0),
            ("rank", "auto"),
            ("task_rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "tsv",
        {"rank": "5"},
        [
            ("method", "tsv"),
            ("method_scale", 1.0),
            ("rank", 5),
            ("task_rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "tsv",
        {"task_rank": 2},
        [
            ("method", "tsv"),
            ("method_scale", 1.0),
            ("rank", None),
            ("task_rank", 2),
            ("pad_rank_to", None),
        ],
    ),
    (
        "tsv",
        {"method_scale": 0.5, "keep": 0.9, "task_rank": 2, "rank": "auto", "pad_rank_to": 64},
        [
            ("method", "tsv"),
            ("keep", 0.9),
            ("method_scale", 0.5),
            ("rank", "auto"),
            ("task_rank", 2),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "tsv",
        {"method_scale": 0.5, "task_rank": 2, "rank": 6, "pad_rank_to": 64},
        [
            ("method", "tsv"),
            ("method_scale", 0.5),
            ("rank", 6),
            ("task_rank", 2),
            ("pad_rank_to", 64),
        ],
    ),
    ("iso", {}, [("method", "iso"), ("method_scale", 1.0), ("rank", None), ("pad_rank_to", None)]),
    (
        "iso",
        {"pad_rank_to": 64},
        [("method", "iso"), ("method_scale", 1.0), ("rank", None), ("pad_rank_to", 64)],
    ),
    (
        "iso",
        {"rank": "auto", "keep": 0.9},
        [
            ("method", "iso"),
            ("keep", 0.9),
            ("method_scale", 1.0),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "iso",
        {"method_scale": 0.5},
        [("method", "iso"), ("method_scale", 0.5), ("rank", None), ("pad_rank_to", None)],
    ),
    (
        "iso",
        {"rank": 3},
        [("method", "iso"), ("method_scale", 1.0), ("rank", 3), ("pad_rank_to", None)],
    ),
    (
        "iso",
        {"rank": "auto"},
        [
            ("method", "iso"),
            ("keep", 0.99),
            ("method_scale", 1.0),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "iso",
        {"rank": "5"},
        [("method", "iso"), ("method_scale", 1.0), ("rank", 5), ("pad_rank_to", None)],
    ),
    (
        "iso",
        {"method_scale": 0.5, "keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [
            ("method", "iso"),
            ("keep", 0.9),
            ("method_scale", 0.5),
            ("rank", "auto"),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "iso",
        {"method_scale": 0.5, "rank": 6, "pad_rank_to": 64},
        [("method", "iso"), ("method_scale", 0.5), ("rank", 6), ("pad_rank_to", 64)],
    ),
    ("pico", {}, [("method", "pico"), ("rank", None), ("pad_rank_to", None)]),
    ("pico", {"pad_rank_to": 64}, [("method", "pico"), ("rank", None), ("pad_rank_to", 64)]),
    (
        "pico",
        {"rank": "auto", "keep": 0.9},
        [("method", "pico"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("pico", {"rank": 3}, [("method", "pico"), ("rank", 3), ("pad_rank_to", None)]),
    (
        "pico",
        {"rank": "auto"},
        [("method", "pico"), ("keep", 0.99), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("pico", {"rank": "5"}, [("method", "pico"), ("rank", 5), ("pad_rank_to", None)]),
    (
        "pico",
        {"keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [("method", "pico"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", 64)],
    ),
    (
        "pico",
        {"rank": 6, "pad_rank_to": 64},
        [("method", "pico"), ("rank", 6), ("pad_rank_to", 64)],
    ),
    (
        "knots_ties",
        {"density": 0.2},
        [
            ("method", "knots_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.2, "pad_rank_to": 64},
        [
            ("method", "knots_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", None),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.3},
        [
            ("method", "knots_ties"),
            ("density", 0.3),
            ("majority_sign", "total"),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.2, "rank": "auto", "keep": 0.9},
        [
            ("method", "knots_ties"),
            ("density", 0.2),
            ("keep", 0.9),
            ("majority_sign", "total"),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.2, "majority_sign": "frequency"},
        [
            ("method", "knots_ties"),
            ("density", 0.2),
            ("majority_sign", "frequency"),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.2, "rank": 3},
        [
            ("method", "knots_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", 3),
            ("pad_rank_to", None),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.2, "rank": "auto"},
        [
            ("method", "knots_ties"),
            ("density", 0.2),
            ("keep", 0.99),
            ("majority_sign", "total"),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.2, "rank": "5"},
        [
            ("method", "knots_ties"),
            ("density", 0.2),
            ("majority_sign", "total"),
            ("rank", 5),
            ("pad_rank_to", None),
        ],
    ),
    (
        "knots_ties",
        {
            "density": 0.3,
            "majority_sign": "frequency",
            "keep": 0.9,
            "rank": "auto",
            "pad_rank_to": 64,
        },
        [
            ("method", "knots_ties"),
            ("density", 0.3),
            ("keep", 0.9),
            ("majority_sign", "frequency"),
            ("rank", "auto"),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "knots_ties",
        {"density": 0.3, "majority_sign": "frequency", "rank": 6, "pad_rank_to": 64},
        [
            ("method", "knots_ties"),
            ("density", 0.3),
            ("majority_sign", "frequency"),
            ("rank", 6),
            ("pad_rank_to", 64),
        ],
    ),
    ("knots_ta", {}, [("method", "knots_ta"), ("rank", None), ("pad_rank_to", None)]),
    (
        "knots_ta",
        {"pad_rank_to": 64},
        [("method", "knots_ta"), ("rank", None), ("pad_rank_to", 64)],
    ),
    (
        "knots_ta",
        {"rank": "auto", "keep": 0.9},
        [("method", "knots_ta"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("knots_ta", {"rank": 3}, [("method", "knots_ta"), ("rank", 3), ("pad_rank_to", None)]),
    (
        "knots_ta",
        {"rank": "auto"},
        [("method", "knots_ta"), ("keep", 0.99), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("knots_ta", {"rank": "5"}, [("method", "knots_ta"), ("rank", 5), ("pad_rank_to", None)]),
    (
        "knots_ta",
        {"keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [("method", "knots_ta"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", 64)],
    ),
    (
        "knots_ta",
        {"rank": 6, "pad_rank_to": 64},
        [("method", "knots_ta"), ("rank", 6), ("pad_rank_to", 64)],
    ),
    (
        "lora_lego",
        {},
        [("method", "lora_lego"), ("rank", None), ("seed", 0), ("pad_rank_to", None)],
    ),
    (
        "lora_lego",
        {"pad_rank_to": 64},
        [("method", "lora_lego"), ("rank", None), ("seed", 0), ("pad_rank_to", 64)],
    ),
    (
        "lora_lego",
        {"rank": 3},
        [("method", "lora_lego"), ("rank", 3), ("seed", 0), ("pad_rank_to", None)],
    ),
    (
        "lora_lego",
        {"rank": "auto"},
        [("method", "lora_lego"), ("rank", "auto"), ("seed", 0), ("pad_rank_to", None)],
    ),
    (
        "lora_lego",
        {"rank": "5"},
        [("method", "lora_lego"), ("rank", 5), ("seed", 0), ("pad_rank_to", None)],
    ),
    (
        "lora_lego",
        {"seed": 7},
        [("method", "lora_lego"), ("rank", None), ("seed", 7), ("pad_rank_to", None)],
    ),
    (
        "lora_lego",
        {"seed": 7, "rank": 6, "pad_rank_to": 64},
        [("method", "lora_lego"), ("rank", 6), ("seed", 7), ("pad_rank_to", 64)],
    ),
    (
        "regmean",
        {},
        [("method", "regmean"), ("rank", None), ("regmean_alpha", 0.9), ("pad_rank_to", None)],
    ),
    (
        "regmean",
        {"pad_rank_to": 64},
        [("method", "regmean"), ("rank", None), ("regmean_alpha", 0.9), ("pad_rank_to", 64)],
    ),
    (
        "regmean",
        {"rank": "auto", "keep": 0.9},
        [
            ("method", "regmean"),
            ("keep", 0.9),
            ("rank", "auto"),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean",
        {"rank": 3},
        [("method", "regmean"), ("rank", 3), ("regmean_alpha", 0.9), ("pad_rank_to", None)],
    ),
    (
        "regmean",
        {"rank": "auto"},
        [
            ("method", "regmean"),
            ("keep", 0.99),
            ("rank", "auto"),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean",
        {"rank": "5"},
        [("method", "regmean"), ("rank", 5), ("regmean_alpha", 0.9), ("pad_rank_to", None)],
    ),
    (
        "regmean",
        {"regmean_alpha": 0.5},
        [("method", "regmean"), ("rank", None), ("regmean_alpha", 0.5), ("pad_rank_to", None)],
    ),
    (
        "regmean",
        {"regmean_alpha": 0.5, "keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [
            ("method", "regmean"),
            ("keep", 0.9),
            ("rank", "auto"),
            ("regmean_alpha", 0.5),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "regmean",
        {"regmean_alpha": 0.5, "rank": 6, "pad_rank_to": 64},
        [("method", "regmean"), ("rank", 6), ("regmean_alpha", 0.5), ("pad_rank_to", 64)],
    ),
    (
        "regmean_rescaled",
        {},
        [
            ("method", "regmean_rescaled"),
            ("rank", None),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean_rescaled",
        {"pad_rank_to": 64},
        [
            ("method", "regmean_rescaled"),
            ("rank", None),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "regmean_rescaled",
        {"rank": "auto", "keep": 0.9},
        [
            ("method", "regmean_rescaled"),
            ("keep", 0.9),
            ("rank", "auto"),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean_rescaled",
        {"rank": 3},
        [
            ("method", "regmean_rescaled"),
            ("rank", 3),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean_rescaled",
        {"rank": "auto"},
        [
            ("method", "regmean_rescaled"),
            ("keep", 0.99),
            ("rank", "auto"),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean_rescaled",
        {"rank": "5"},
        [
            ("method", "regmean_rescaled"),
            ("rank", 5),
            ("regmean_alpha", 0.9),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean_rescaled",
        {"regmean_alpha": 0.5},
        [
            ("method", "regmean_rescaled"),
            ("rank", None),
            ("regmean_alpha", 0.5),
            ("pad_rank_to", None),
        ],
    ),
    (
        "regmean_rescaled",
        {"regmean_alpha": 0.5, "keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [
            ("method", "regmean_rescaled"),
            ("keep", 0.9),
            ("rank", "auto"),
            ("regmean_alpha", 0.5),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "regmean_rescaled",
        {"regmean_alpha": 0.5, "rank": 6, "pad_rank_to": 64},
        [("method", "regmean_rescaled"), ("rank", 6), ("regmean_alpha", 0.5), ("pad_rank_to", 64)],
    ),
    (
        "orthogonal_projection",
        {},
        [
            ("method", "orthogonal_projection"),
            ("projection_ratio", 4.0),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "orthogonal_projection",
        {"pad_rank_to": 64},
        [
            ("method", "orthogonal_projection"),
            ("projection_ratio", 4.0),
            ("rank", None),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "orthogonal_projection",
        {"rank": "auto", "keep": 0.9},
        [
            ("method", "orthogonal_projection"),
            ("keep", 0.9),
            ("projection_ratio", 4.0),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "orthogonal_projection",
        {"projection_ratio": 2.0},
        [
            ("method", "orthogonal_projection"),
            ("projection_ratio", 2.0),
            ("rank", None),
            ("pad_rank_to", None),
        ],
    ),
    (
        "orthogonal_projection",
        {"rank": 3},
        [
            ("method", "orthogonal_projection"),
            ("projection_ratio", 4.0),
            ("rank", 3),
            ("pad_rank_to", None),
        ],
    ),
    (
        "orthogonal_projection",
        {"rank": "auto"},
        [
            ("method", "orthogonal_projection"),
            ("keep", 0.99),
            ("projection_ratio", 4.0),
            ("rank", "auto"),
            ("pad_rank_to", None),
        ],
    ),
    (
        "orthogonal_projection",
        {"rank": "5"},
        [
            ("method", "orthogonal_projection"),
            ("projection_ratio", 4.0),
            ("rank", 5),
            ("pad_rank_to", None),
        ],
    ),
    (
        "orthogonal_projection",
        {"projection_ratio": 2.0, "keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [
            ("method", "orthogonal_projection"),
            ("keep", 0.9),
            ("projection_ratio", 2.0),
            ("rank", "auto"),
            ("pad_rank_to", 64),
        ],
    ),
    (
        "orthogonal_projection",
        {"projection_ratio": 2.0, "rank": 6, "pad_rank_to": 64},
        [
            ("method", "orthogonal_projection"),
            ("projection_ratio", 2.0),
            ("rank", 6),
            ("pad_rank_to", 64),
        ],
    ),
    ("soft_projection", {}, [("method", "soft_projection"), ("rank", None), ("pad_rank_to", None)]),
    (
        "soft_projection",
        {"pad_rank_to": 64},
        [("method", "soft_projection"), ("rank", None), ("pad_rank_to", 64)],
    ),
    (
        "soft_projection",
        {"rank": "auto", "keep": 0.9},
        [("method", "soft_projection"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    (
        "soft_projection",
        {"rank": 3},
        [("method", "soft_projection"), ("rank", 3), ("pad_rank_to", None)],
    ),
    (
        "soft_projection",
        {"rank": "auto"},
        [("method", "soft_projection"), ("keep", 0.99), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    (
        "soft_projection",
        {"rank": "5"},
        [("method", "soft_projection"), ("rank", 5), ("pad_rank_to", None)],
    ),
    (
        "soft_projection",
        {"keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [("method", "soft_projection"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", 64)],
    ),
    (
        "soft_projection",
        {"rank": 6, "pad_rank_to": 64},
        [("method", "soft_projection"), ("rank", 6), ("pad_rank_to", 64)],
    ),
    ("shift_match", {}, [("method", "shift_match"), ("rank", None), ("pad_rank_to", None)]),
    (
        "shift_match",
        {"pad_rank_to": 64},
        [("method", "shift_match"), ("rank", None), ("pad_rank_to", 64)],
    ),
    (
        "shift_match",
        {"rank": "auto", "keep": 0.9},
        [("method", "shift_match"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("shift_match", {"rank": 3}, [("method", "shift_match"), ("rank", 3), ("pad_rank_to", None)]),
    (
        "shift_match",
        {"rank": "auto"},
        [("method", "shift_match"), ("keep", 0.99), ("rank", "auto"), ("pad_rank_to", None)],
    ),
    ("shift_match", {"rank": "5"}, [("method", "shift_match"), ("rank", 5), ("pad_rank_to", None)]),
    (
        "shift_match",
        {"keep": 0.9, "rank": "auto", "pad_rank_to": 64},
        [("method", "shift_match"), ("keep", 0.9), ("rank", "auto"), ("pad_rank_to", 64)],
    ),
    (
        "shift_match",
        {"rank": 6, "pad_rank_to": 64},
        [("method", "shift_match"), ("rank", 6), ("pad_rank_to", 64)],
    ),
]

ERRORS = [
    (
        "sum",
        {"rank": 3},
        "compose --method sum: --rank does not apply to sum (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, "
        "lora_lego, regmean, regmean_rescaled, orthogonal_projection, soft_projection, "
        "shift_match)",
    ),
    (
        "sum",
        {"keep": 0.9},
        "compose --method sum: --keep does not apply to sum (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, regmean, "
        "regmean_rescaled, orthogonal_projection, soft_projection, shift_match)",
    ),
    (
        "sum",
        {"density": 0.3},
        "compose --method sum: --density does not apply to sum (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "sum",
        {"majority_sign": "frequency"},
        "compose --method sum: --majority-sign does not apply to sum (it applies to ties, "
        "dare_ties, knots_ties)",
    ),
    (
        "sum",
        {"seed": 7},
        "compose --method sum: --seed does not apply to sum (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "sum",
        {"method_scale": 0.5},
        "compose --method sum: --method-scale does not apply to sum (it applies to tsv, iso)",
    ),
    (
        "sum",
        {"task_rank": 2},
        "compose --method sum: --task-rank does not apply to sum (it applies to tsv)",
    ),
    (
        "sum",
        {"regmean_alpha": 0.5},
        "compose --method sum: --regmean-alpha does not apply to sum (it applies to regmean, "
        "regmean_rescaled)",
    ),
    (
        "sum",
        {"projection_ratio": 2.0},
        "compose --method sum: --projection-ratio does not apply to sum (it applies to "
        "orthogonal_projection)",
    ),
    (
        "weighted",
        {"rank": 3},
        "compose --method weighted: --rank does not apply to weighted (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, "
        "lora_lego, regmean, regmean_rescaled, orthogonal_projection, soft_projection, "
        "shift_match)",
    ),
    (
        "weighted",
        {"keep": 0.9},
        "compose --method weighted: --keep does not apply to weighted (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, regmean, "
        "regmean_rescaled, orthogonal_projection, soft_projection, shift_match)",
    ),
    (
        "weighted",
        {"density": 0.3},
        "compose --method weighted: --density does not apply to weighted (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "weighted",
        {"majority_sign": "frequency"},
        "compose --method weighted: --majority-sign does not apply to weighted (it applies to "
        "ties, dare_ties, knots_ties)",
    ),
    (
        "weighted",
        {"seed": 7},
        "compose --method weighted: --seed does not apply to weighted (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "weighted",
        {"method_scale": 0.5},
        "compose --method weighted: --method-scale does not apply to weighted (it applies to tsv, "
        "iso)",
    ),
    (
        "weighted",
        {"task_rank": 2},
        "compose --method weighted: --task-rank does not apply to weighted (it applies to tsv)",
    ),
    (
        "weighted",
        {"regmean_alpha": 0.5},
        "compose --method weighted: --regmean-alpha does not apply to weighted (it applies to "
        "regmean, regmean_rescaled)",
    ),
    (
        "weighted",
        {"projection_ratio": 2.0},
        "compose --method weighted: --projection-ratio does not apply to weighted (it applies to "
        "orthogonal_projection)",
    ),
    (
        "mean",
        {"rank": 3},
        "compose --method mean: --rank does not apply to mean (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, "
        "lora_lego, regmean, regmean_rescaled, orthogonal_projection, soft_projection, "
        "shift_match)",
    ),
    (
        "mean",
        {"keep": 0.9},
        "compose --method mean: --keep does not apply to mean (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, regmean, "
        "regmean_rescaled, orthogonal_projection, soft_projection, shift_match)",
    ),
    (
        "mean",
        {"density": 0.3},
        "compose --method mean: --density does not apply to mean (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "mean",
        {"majority_sign": "frequency"},
        "compose --method mean: --majority-sign does not apply to mean (it applies to ties, "
        "dare_ties, knots_ties)",
    ),
    (
        "mean",
        {"seed": 7},
        "compose --method mean: --seed does not apply to mean (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "mean",
        {"method_scale": 0.5},
        "compose --method mean: --method-scale does not apply to mean (it applies to tsv, iso)",
    ),
    (
        "mean",
        {"task_rank": 2},
        "compose --method mean: --task-rank does not apply to mean (it applies to tsv)",
    ),
    (
        "mean",
        {"regmean_alpha": 0.5},
        "compose --method mean: --regmean-alpha does not apply to mean (it applies to regmean, "
        "regmean_rescaled)",
    ),
    (
        "mean",
        {"projection_ratio": 2.0},
        "compose --method mean: --projection-ratio does not apply to mean (it applies to "
        "orthogonal_projection)",
    ),
    ("svd", {}, "compose --method svd: svd needs --rank K (an integer) or --rank auto"),
    (
        "svd",
        {"rank": 4, "density": 0.3},
        "compose --method svd: --density does not apply to svd (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "svd",
        {"rank": 4, "majority_sign": "frequency"},
        "compose --method svd: --majority-sign does not apply to svd (it applies to ties, "
        "dare_ties, knots_ties)",
    ),
    (
        "svd",
        {"rank": 4, "seed": 7},
        "compose --method svd: --seed does not apply to svd (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "svd",
        {"rank": 4, "method_scale": 0.5},
        "compose --method svd: --method-scale does not apply to svd (it applies to tsv, iso)",
    ),
    (
        "svd",
        {"rank": 4, "task_rank": 2},
        "compose --method svd: --task-rank does not apply to svd (it applies to tsv)",
    ),
    (
        "svd",
        {"rank": 4, "regmean_alpha": 0.5},
        "compose --method svd: --regmean-alpha does not apply to svd (it applies to regmean, "
        "regmean_rescaled)",
    ),
    (
        "svd",
        {"rank": 4, "projection_ratio": 2.0},
        "compose --method svd: --projection-ratio does not apply to svd (it applies to "
        "orthogonal_projection)",
    ),
    (
        "ties",
        {},
        "compose --method ties: ties needs --density (the fraction of ΔW entries kept, e.g. 0.2)",
    ),
    (
        "ties",
        {"density": 0.2, "seed": 7},
        "compose --method ties: --seed does not apply to ties (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "ties",
        {"density": 0.2, "method_scale": 0.5},
        "compose --method ties: --method-scale does not apply to ties (it applies to tsv, iso)",
    ),
    (
        "ties",
        {"density": 0.2, "task_rank": 2},
        "compose --method ties: --task-rank does not apply to ties (it applies to tsv)",
    ),
    (
        "ties",
        {"density": 0.2, "regmean_alpha": 0.5},
        "compose --method ties: --regmean-alpha does not apply to ties (it applies to regmean, "
        "regmean_rescaled)",
    ),
    (
        "ties",
        {"density": 0.2, "projection_ratio": 2.0},
        "compose --method ties: --projection-ratio does not apply to ties (it applies to "
        "orthogonal_projection)",
    ),
    (
        "magnitude_prune",
        {},
        "compose --method magnitude_prune: magnitude_prune needs --density (the fraction of ΔW "
        "entries kept, e.g. 0.2)",
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "majority_sign": "frequency"},
        "compose --method magnitude_prune: --majority-sign does not apply to magnitude_prune (it "
        "applies to ties, dare_ties, knots_ties)",
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "seed": 7},
        "compose --method magnitude_prune: --seed does not apply to magnitude_prune (it applies "
        "to dare_linear, dare_ties, lora_lego)",
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "method_scale": 0.5},
        "compose --method magnitude_prune: --method-scale does not apply to magnitude_prune (it "
        "applies to tsv, iso)",
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "task_rank": 2},
        "compose --method magnitude_prune: --task-rank does not apply to magnitude_prune (it "
        "applies to tsv)",
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "regmean_alpha": 0.5},
        "compose --method magnitude_prune: --regmean-alpha does not apply to magnitude_prune (it "
        "applies to regmean, regmean_rescaled)",
    ),
    (
        "magnitude_prune",
        {"density": 0.2, "projection_ratio": 2.0},
        "compose --method magnitude_prune: --projection-ratio does not apply to magnitude_prune "
        "(it applies to orthogonal_projection)",
    ),
    (
        "dare_linear",
        {},
        "compose --method dare_linear: dare_linear needs --density (the fraction of ΔW entries "
        "kept, e.g. 0.2)",
    ),
    (
        "dare_linear",
        {"density": 0.2, "majority_sign": "frequency"},
        "compose --method dare_linear: --majority-sign does not apply to dare_linear (it applies "
        "to ties, dare_ties, knots_ties)",
    ),
    (
        "dare_linear",
        {"density": 0.2, "method_scale": 0.5},
        "compose --method dare_linear: --method-scale does not apply to dare_linear (it applies "
        "to tsv, iso)",
    ),
    (
        "dare_linear",
        {"density": 0.2, "task_rank": 2},
        "compose --method dare_linear: --task-rank does not apply to dare_linear (it applies to "
        "tsv)",
    ),
    (
        "dare_linear",
        {"density": 0.2, "regmean_alpha": 0.5},
        "compose --method dare_linear: --regmean-alpha does not apply to dare_linear (it applies "
        "to regmean, regmean_rescaled)",
    ),
    (
        "dare_linear",
        {"density": 0.2, "projection_ratio": 2.0},
        "compose --method dare_linear: --projection-ratio does not apply to dare_linear (it "
        "applies to orthogonal_projection)",
    ),
    (
        "dare_ties",
        {},
        "compose --method dare_ties: dare_ties needs --density (the fraction of ΔW entries kept, "
        "e.g. 0.2)",
    ),
    (
        "dare_ties",
        {"density": 0.2, "method_scale": 0.5},
        "compose --method dare_ties: --method-scale does not apply to dare_ties (it applies to "
        "tsv, iso)",
    ),
    (
        "dare_ties",
        {"density": 0.2, "task_rank": 2},
        "compose --method dare_ties: --task-rank does not apply to dare_ties (it applies to tsv)",
    ),
    (
        "dare_ties",
        {"density": 0.2, "regmean_alpha": 0.5},
        "compose --method dare_ties: --regmean-alpha does not apply to dare_ties (it applies to "
        "regmean, regmean_rescaled)",
    ),
    (
        "dare_ties",
        {"density": 0.2, "projection_ratio": 2.0},
        "compose --method dare_ties: --projection-ratio does not apply to dare_ties (it applies "
        "to orthogonal_projection)",
    ),
    (
        "tsv",
        {"density": 0.3},
        "compose --method tsv: --density does not apply to tsv (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "tsv",
        {"majority_sign": "frequency"},
        "compose --method tsv: --majority-sign does not apply to tsv (it applies to ties, "
        "dare_ties, knots_ties)",
    ),
    (
        "tsv",
        {"seed": 7},
        "compose --method tsv: --seed does not apply to tsv (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "tsv",
        {"regmean_alpha": 0.5},
        "compose --method tsv: --regmean-alpha does not apply to tsv (it applies to regmean, "
        "regmean_rescaled)",
    ),
    (
        "tsv",
        {"projection_ratio": 2.0},
        "compose --method tsv: --projection-ratio does not apply to tsv (it applies to "
        "orthogonal_projection)",
    ),
    (
        "iso",
        {"density": 0.3},
        "compose --method iso: --density does not apply to iso (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "iso",
        {"majority_sign": "frequency"},
        "compose --method iso: --majority-sign does not apply to iso (it applies to ties, "
        "dare_ties, knots_ties)",
    ),
    (
        "iso",
        {"seed": 7},
        "compose --method iso: --seed does not apply to iso (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "iso",
        {"task_rank": 2},
        "compose --method iso: --task-rank does not apply to iso (it applies to tsv)",
    ),
    (
        "iso",
        {"regmean_alpha": 0.5},
        "compose --method iso: --regmean-alpha does not apply to iso (it applies to regmean, "
        "regmean_rescaled)",
    ),
    (
        "iso",
        {"projection_ratio": 2.0},
        "compose --method iso: --projection-ratio does not apply to iso (it applies to "
        "orthogonal_projection)",
    ),
    (
        "pico",
        {"density": 0.3},
        "compose --method pico: --density does not apply to pico (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "pico",
        {"majority_sign": "frequency"},
        "compose --method pico: --majority-sign does not apply to pico (it applies to ties, "
        "dare_ties, knots_ties)",
    ),
    (
        "pico",
        {"seed": 7},
        "compose --method pico: --seed does not apply to pico (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "pico",
        {"method_scale": 0.5},
        "compose --method pico: --method-scale does not apply to pico (it applies to tsv, iso)",
    ),
    (
        "pico",
        {"task_rank": 2},
        "compose --method pico: --task-rank does not apply to pico (it applies to tsv)",
    ),
    (
        "pico",
        {"regmean_alpha": 0.5},
        "compose --method pico: --regmean-alpha does not apply to pico (it applies to regmean, "
        "regmean_rescaled)",
    ),
    (
        "pico",
        {"projection_ratio": 2.0},
        "compose --method pico: --projection-ratio does not apply to pico (it applies to "
        "orthogonal_projection)",
    ),
    (
        "knots_ties",
        {},
        "compose --method knots_ties: knots_ties needs --density (the fraction of ΔW entries "
        "kept, e.g. 0.2)",
    ),
    (
        "knots_ties",
        {"density": 0.2, "seed": 7},
        "compose --method knots_ties: --seed does not apply to knots_ties (it applies to "
        "dare_linear, dare_ties, lora_lego)",
    ),
    (
        "knots_ties",
        {"density": 0.2, "method_scale": 0.5},
        "compose --method knots_ties: --method-scale does not apply to knots_ties (it applies to "
        "tsv, iso)",
    ),
    (
        "knots_ties",
        {"density": 0.2, "task_rank": 2},
        "compose --method knots_ties: --task-rank does not apply to knots_ties (it applies to tsv)",
    ),
    (
        "knots_ties",
        {"density": 0.2, "regmean_alpha": 0.5},
        "compose --method knots_ties: --regmean-alpha does not apply to knots_ties (it applies to "
        "regmean, regmean_rescaled)",
    ),
    (
        "knots_ties",
        {"density": 0.2, "projection_ratio": 2.0},
        "compose --method knots_ties: --projection-ratio does not apply to knots_ties (it applies "
        "to orthogonal_projection)",
    ),
    (
        "knots_ta",
        {"density": 0.3},
        "compose --method knots_ta: --density does not apply to knots_ta (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "knots_ta",
        {"majority_sign": "frequency"},
        "compose --method knots_ta: --majority-sign does not apply to knots_ta (it applies to "
        "ties, dare_ties, knots_ties)",
    ),
    (
        "knots_ta",
        {"seed": 7},
        "compose --method knots_ta: --seed does not apply to knots_ta (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "knots_ta",
        {"method_scale": 0.5},
        "compose --method knots_ta: --method-scale does not apply to knots_ta (it applies to tsv, "
        "iso)",
    ),
    (
        "knots_ta",
        {"task_rank": 2},
        "compose --method knots_ta: --task-rank does not apply to knots_ta (it applies to tsv)",
    ),
    (
        "knots_ta",
        {"regmean_alpha": 0.5},
        "compose --method knots_ta: --regmean-alpha does not apply to knots_ta (it applies to "
        "regmean, regmean_rescaled)",
    ),
    (
        "knots_ta",
        {"projection_ratio": 2.0},
        "compose --method knots_ta: --projection-ratio does not apply to knots_ta (it applies to "
        "orthogonal_projection)",
    ),
    (
        "lora_lego",
        {"keep": 0.9},
        "compose --method lora_lego: --keep does not apply to lora_lego (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, regmean, "
        "regmean_rescaled, orthogonal_projection, soft_projection, shift_match)",
    ),
    (
        "lora_lego",
        {"density": 0.3},
        "compose --method lora_lego: --density does not apply to lora_lego (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "lora_lego",
        {"majority_sign": "frequency"},
        "compose --method lora_lego: --majority-sign does not apply to lora_lego (it applies to "
        "ties, dare_ties, knots_ties)",
    ),
    (
        "lora_lego",
        {"method_scale": 0.5},
        "compose --method lora_lego: --method-scale does not apply to lora_lego (it applies to "
        "tsv, iso)",
    ),
    (
        "lora_lego",
        {"task_rank": 2},
        "compose --method lora_lego: --task-rank does not apply to lora_lego (it applies to tsv)",
    ),
    (
        "lora_lego",
        {"regmean_alpha": 0.5},
        "compose --method lora_lego: --regmean-alpha does not apply to lora_lego (it applies to "
        "regmean, regmean_rescaled)",
    ),
    (
        "lora_lego",
        {"projection_ratio": 2.0},
        "compose --method lora_lego: --projection-ratio does not apply to lora_lego (it applies "
        "to orthogonal_projection)",
    ),
    (
        "regmean",
        {"density": 0.3},
        "compose --method regmean: --density does not apply to regmean (it applies to ties, "
        "magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "regmean",
        {"majority_sign": "frequency"},
        "compose --method regmean: --majority-sign does not apply to regmean (it applies to ties, "
        "dare_ties, knots_ties)",
    ),
    (
        "regmean",
        {"seed": 7},
        "compose --method regmean: --seed does not apply to regmean (it applies to dare_linear, "
        "dare_ties, lora_lego)",
    ),
    (
        "regmean",
        {"method_scale": 0.5},
        "compose --method regmean: --method-scale does not apply to regmean (it applies to tsv, "
        "iso)",
    ),
    (
        "regmean",
        {"task_rank": 2},
        "compose --method regmean: --task-rank does not apply to regmean (it applies to tsv)",
    ),
    (
        "regmean",
        {"projection_ratio": 2.0},
        "compose --method regmean: --projection-ratio does not apply to regmean (it applies to "
        "orthogonal_projection)",
    ),
    (
        "regmean_rescaled",
        {"density": 0.3},
        "compose --method regmean_rescaled: --density does not apply to regmean_rescaled (it "
        "applies to ties, magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "regmean_rescaled",
        {"majority_sign": "frequency"},
        "compose --method regmean_rescaled: --majority-sign does not apply to regmean_rescaled "
        "(it applies to ties, dare_ties, knots_ties)",
    ),
    (
        "regmean_rescaled",
        {"seed": 7},
        "compose --method regmean_rescaled: --seed does not apply to regmean_rescaled (it applies "
        "to dare_linear, dare_ties, lora_lego)",
    ),
    (
        "regmean_rescaled",
        {"method_scale": 0.5},
        "compose --method regmean_rescaled: --method-scale does not apply to regmean_rescaled (it "
        "applies to tsv, iso)",
    ),
    (
        "regmean_rescaled",
        {"task_rank": 2},
        "compose --method regmean_rescaled: --task-rank does not apply to regmean_rescaled (it "
        "applies to tsv)",
    ),
    (
        "regmean_rescaled",
        {"projection_ratio": 2.0},
        "compose --method regmean_rescaled: --projection-ratio does not apply to regmean_rescaled "
        "(it applies to orthogonal_projection)",
    ),
    (
        "orthogonal_projection",
        {"density": 0.3},
        "compose --method orthogonal_projection: --density does not apply to "
        "orthogonal_projection (it applies to ties, magnitude_prune, dare_linear, dare_ties, "
        "knots_ties)",
    ),
    (
        "orthogonal_projection",
        {"majority_sign": "frequency"},
        "compose --method orthogonal_projection: --majority-sign does not apply to "
        "orthogonal_projection (it applies to ties, dare_ties, knots_ties)",
    ),
    (
        "orthogonal_projection",
        {"seed": 7},
        "compose --method orthogonal_projection: --seed does not apply to orthogonal_projection "
        "(it applies to dare_linear, dare_ties, lora_lego)",
    ),
    (
        "orthogonal_projection",
        {"method_scale": 0.5},
        "compose --method orthogonal_projection: --method-scale does not apply to "
        "orthogonal_projection (it applies to tsv, iso)",
    ),
    (
        "orthogonal_projection",
        {"task_rank": 2},
        "compose --method orthogonal_projection: --task-rank does not apply to "
        "orthogonal_projection (it applies to tsv)",
    ),
    (
        "orthogonal_projection",
        {"regmean_alpha": 0.5},
        "compose --method orthogonal_projection: --regmean-alpha does not apply to "
        "orthogonal_projection (it applies to regmean, regmean_rescaled)",
    ),
    (
        "soft_projection",
        {"density": 0.3},
        "compose --method soft_projection: --density does not apply to soft_projection (it "
        "applies to ties, magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "soft_projection",
        {"majority_sign": "frequency"},
        "compose --method soft_projection: --majority-sign does not apply to soft_projection (it "
        "applies to ties, dare_ties, knots_ties)",
    ),
    (
        "soft_projection",
        {"seed": 7},
        "compose --method soft_projection: --seed does not apply to soft_projection (it applies "
        "to dare_linear, dare_ties, lora_lego)",
    ),
    (
        "soft_projection",
        {"method_scale": 0.5},
        "compose --method soft_projection: --method-scale does not apply to soft_projection (it "
        "applies to tsv, iso)",
    ),
    (
        "soft_projection",
        {"task_rank": 2},
        "compose --method soft_projection: --task-rank does not apply to soft_projection (it "
        "applies to tsv)",
    ),
    (
        "soft_projection",
        {"regmean_alpha": 0.5},
        "compose --method soft_projection: --regmean-alpha does not apply to soft_projection (it "
        "applies to regmean, regmean_rescaled)",
    ),
    (
        "soft_projection",
        {"projection_ratio": 2.0},
        "compose --method soft_projection: --projection-ratio does not apply to soft_projection "
        "(it applies to orthogonal_projection)",
    ),
    (
        "shift_match",
        {"density": 0.3},
        "compose --method shift_match: --density does not apply to shift_match (it applies to "
        "ties, magnitude_prune, dare_linear, dare_ties, knots_ties)",
    ),
    (
        "shift_match",
        {"majority_sign": "frequency"},
        "compose --method shift_match: --majority-sign does not apply to shift_match (it applies "
        "to ties, dare_ties, knots_ties)",
    ),
    (
        "shift_match",
        {"seed": 7},
        "compose --method shift_match: --seed does not apply to shift_match (it applies to "
        "dare_linear, dare_ties, lora_lego)",
    ),
    (
        "shift_match",
        {"method_scale": 0.5},
        "compose --method shift_match: --method-scale does not apply to shift_match (it applies "
        "to tsv, iso)",
    ),
    (
        "shift_match",
        {"task_rank": 2},
        "compose --method shift_match: --task-rank does not apply to shift_match (it applies to "
        "tsv)",
    ),
    (
        "shift_match",
        {"regmean_alpha": 0.5},
        "compose --method shift_match: --regmean-alpha does not apply to shift_match (it applies "
        "to regmean, regmean_rescaled)",
    ),
    (
        "shift_match",
        {"projection_ratio": 2.0},
        "compose --method shift_match: --projection-ratio does not apply to shift_match (it "
        "applies to orthogonal_projection)",
    ),
    ("svd", {"rank": "big"}, "compose --method svd: --rank 'big': expected an integer or 'auto'"),
    ("svd", {"rank": 0}, "compose --method svd: --rank 0: must be ≥ 1 or 'auto'"),
    ("svd", {"rank": True}, "compose --method svd: --rank True: must be ≥ 1 or 'auto'"),
    ("svd", {"rank": -2}, "compose --method svd: --rank -2: must be ≥ 1 or 'auto'"),
    ("svd", {"rank": "0"}, "compose --method svd: --rank 0: must be ≥ 1 or 'auto'"),
    ("svd", {"rank": "auto", "keep": 0.0}, "compose --method svd: --keep 0.0: must be in (0, 1]"),
    ("svd", {"rank": "auto", "keep": 1.5}, "compose --method svd: --keep 1.5: must be in (0, 1]"),
    ("svd", {"rank": 4, "keep": 0.9}, "compose --method svd: --keep only applies with --rank auto"),
    (
        "svd",
        {"keep": 0.9},
        "compose --method svd: svd needs --rank K (an integer) or --rank auto; --keep only "
        "applies with --rank auto",
    ),
    ("ties", {"density": 0.0}, "compose --method ties: --density 0.0: must be in (0, 1]"),
    ("ties", {"density": 1.5}, "compose --method ties: --density 1.5: must be in (0, 1]"),
    (
        "ties",
        {"density": 0.2, "majority_sign": "max"},
        "compose --method ties: --majority-sign 'max': choose total or frequency",
    ),
    (
        "dare_linear",
        {"density": 0.2, "seed": -1},
        "compose --method dare_linear: --seed -1: must be ≥ 0",
    ),
    (
        "tsv",
        {"method_scale": NAN},
        "compose --method tsv: --method-scale nan: must be a finite number",
    ),
    (
        "iso",
        {"method_scale": INF},
        "compose --method iso: --method-scale inf: must be a finite number",
    ),
    ("tsv", {"task_rank": 0}, "compose --method tsv: --task-rank 0: must be ≥ 1"),
    (
        "regmean",
        {"regmean_alpha": 1.5},
        "compose --method regmean: --regmean-alpha 1.5: must be in [0, 1]",
    ),
    (
        "regmean",
        {"regmean_alpha": -0.1},
        "compose --method regmean: --regmean-alpha -0.1: must be in [0, 1]",
    ),
    (
        "orthogonal_projection",
        {"projection_ratio": 0.0},
        "compose --method orthogonal_projection: --projection-ratio 0.0: must be > 0",
    ),
    (
        "orthogonal_projection",
        {"projection_ratio": NAN},
        "compose --method orthogonal_projection: --projection-ratio nan: must be > 0",
    ),
    (
        "orthogonal_projection",
        {"projection_ratio": INF},
        "compose --method orthogonal_projection: --projection-ratio inf: must be > 0",
    ),
    ("sum", {"pad_rank_to": 0}, "compose --method sum: --pad-rank-to 0: must be ≥ 1"),
    (
        "ties",
        {"density": 2.0, "seed": 1, "method_scale": NAN},
        "compose --method ties: --density 2.0: must be in (0, 1]; --method-scale nan: must be a "
        "finite number; --seed does not apply to ties (it applies to dare_linear, dare_ties, "
        "lora_lego); --method-scale does not apply to ties (it applies to tsv, iso)",
    ),
    # the one change: values are now checked in the options' declaration order, so
    # --task-rank's problem comes before --regmean-alpha's (it came last but one)
    (
        "sum",
        {
            "rank": 0,
            "keep": 2.0,
            "density": 0.0,
            "majority_sign": "x",
            "seed": -1,
            "method_scale": NAN,
            "task_rank": 0,
            "regmean_alpha": 2.0,
            "projection_ratio": -1.0,
            "pad_rank_to": 0,
        },
        "compose --method sum: --rank 0: must be ≥ 1 or 'auto'; --keep 2.0: must be in (0, 1]; "
        "--density 0.0: must be in (0, 1]; --majority-sign 'x': choose total or frequency; --seed "
        "-1: must be ≥ 0; --method-scale nan: must be a finite number; --task-rank 0: must be ≥ "
        "1; --regmean-alpha 2.0: must be in [0, 1]; --projection-ratio -1.0: must be > 0; "
        "--pad-rank-to 0: must be ≥ 1; --rank does not apply to sum (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, "
        "lora_lego, regmean, regmean_rescaled, orthogonal_projection, soft_projection, "
        "shift_match); --keep does not apply to sum (it applies to svd, ties, magnitude_prune, "
        "dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, regmean, regmean_rescaled, "
        "orthogonal_projection, soft_projection, shift_match); --density does not apply to sum "
        "(it applies to ties, magnitude_prune, dare_linear, dare_ties, knots_ties); "
        "--majority-sign does not apply to sum (it applies to ties, dare_ties, knots_ties); "
        "--seed does not apply to sum (it applies to dare_linear, dare_ties, lora_lego); "
        "--method-scale does not apply to sum (it applies to tsv, iso); --task-rank does not "
        "apply to sum (it applies to tsv); --regmean-alpha does not apply to sum (it applies to "
        "regmean, regmean_rescaled); --projection-ratio does not apply to sum (it applies to "
        "orthogonal_projection)",
    ),
    (
        "svd",
        {"rank": "x", "keep": 0.5, "seed": 3},
        "compose --method svd: --rank 'x': expected an integer or 'auto'; --seed does not apply "
        "to svd (it applies to dare_linear, dare_ties, lora_lego); --keep only applies with "
        "--rank auto",
    ),
    (
        "lora_lego",
        {"rank": "auto", "keep": 0.9},
        "compose --method lora_lego: --keep does not apply to lora_lego (it applies to svd, ties, "
        "magnitude_prune, dare_linear, dare_ties, tsv, iso, pico, knots_ties, knots_ta, regmean, "
        "regmean_rescaled, orthogonal_projection, soft_projection, shift_match)",
    ),
]


@pytest.mark.parametrize("method, given, expected", RESOLVED)
def test_resolved_is_what_the_one_field_per_option_config_recorded(method, given, expected):
    assert list(MergeConfig(method=method, **given).resolved().items()) == expected


def test_the_tables_cover_every_method_and_option():
    assert {m for m, _, _ in RESOLVED} == set(method_names())
    for name in method_names():
        given = {o for m, g, _ in RESOLVED if m == name for o in g}
        assert given == get_method(name).option_names | {"pad_rank_to"}, name


@pytest.mark.parametrize("method, given, message", ERRORS)
def test_problems_are_reported_as_before(method, given, message):
    with pytest.raises(LorasumError) as e:
        MergeConfig(method=method, **given)
    assert str(e.value) == message


def test_an_unknown_option_is_an_unknown_keyword():
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        MergeConfig(method="sum", foo=1)


def test_none_is_not_given_and_equal_configs_compare_equal():
    assert MergeConfig(method="sum", rank=None).given() == []
    assert MergeConfig("svd", rank="4") == MergeConfig("svd", rank=4)
    assert MergeConfig("svd", rank=4).replace(rank="auto").resolved()["keep"] == 0.99
    assert MergeConfig("ties", density=0.2).option("majority_sign") == "total"


def test_a_shared_option_is_declared_once():
    """One flag means one thing: a second declaration under a taken name is refused."""
    other_rank = Option("rank", int, None, "something else")
    with pytest.raises(ValueError, match="option 'rank' is declared again"):
        registry.register(MergeMethod("other", lambda *a: None, "x", options=(other_rank,)))
    assert "other" not in method_names()


def test_a_new_method_with_a_new_option_needs_only_its_declaration(monkeypatch):
    """The method's own Option and one registration: MergeConfig, resolved() and the compose
    flags follow."""
    from lorasum.cli import build_parser

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    steps = Option("steps", int, 3, "refinement steps", check=at_least(1))
    registry.register(
        MergeMethod(
            "refined",
            lambda *a: None,
            "a method with its own option",
            options=(steps, DENSITY, RANK),
            required=frozenset({"density"}),
            notes={"steps": "of the refinement"},
        )
    )
    assert MergeConfig("refined", density=0.5).resolved() == {
        "method": "refined",
        "density": 0.5,
        "rank": None,
        "steps": 3,
        "pad_rank_to": None,
    }
    with pytest.raises(LorasumError, match="--steps 0: must be ≥ 1"):
        MergeConfig("refined", density=0.5, steps=0)
    with pytest.raises(
        LorasumError, match=r"--steps does not apply to ties \(it applies to refined\)"
    ):
        MergeConfig("ties", density=0.5, steps=2)
    args = build_parser().parse_args(
        ["compose", "a", "b", "--out", "o", "--method", "refined", "--steps", "5"]
    )
    assert args.steps == 5 and args.density is None
    assert "refined: required" in registry.option_help(DENSITY)
    assert "refined: of the refinement" in registry.option_help(steps)


def test_options_read_as_attributes():
    """``config.density`` reads the option (its default where not given), like `option`;
    a name no method declares is an AttributeError, and the config still pickles."""
    import pickle

    config = MergeConfig("ties", density=0.3)
    assert config.density == 0.3 == config.option("density")
    assert config.majority_sign == config.option("majority_sign")
    with pytest.raises(AttributeError, match="no option 'dinsity'"):
        _ = config.dinsity
    assert pickle.loads(pickle.dumps(config)) == config
