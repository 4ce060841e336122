"""EvoComp: learned visual-token compression via semantic-guided evolutionary labeling."""

__version__ = "0.1.0"
