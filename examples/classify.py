"""A minimal app embedding an edgetl bundle (numpy + tokenizers + ONNX Runtime; no torch).

    python examples/classify.py runs/sst-int8/06-bundle "a gorgeous, witty, seductive movie" "the plot is a mess"
"""

import sys

from edgetl.runtime import TextClassifier


def main(bundle: str, texts: list[str]) -> None:
    classifier = TextClassifier.load(bundle)  # checks every file's sha256, picks an installed runtime
    for text, prediction in zip(texts, classifier.predict(texts), strict=True):
        print(f"{prediction.label}\t{prediction.score:.3f}\t{text}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["a gorgeous, witty, seductive movie"])
