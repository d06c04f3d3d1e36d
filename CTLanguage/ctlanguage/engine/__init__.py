"""The engine: one contract for every model (``protocol``), the Engine that composes backends
(``engine``), encodings (``encoding``), findings (``finding``) and scores (``scoring``).

Importing this package imports no model code, no torch and no training code; backends are loaded
by ``Engine.load`` through ``ctlanguage.backends``.
"""

from .encoding import ENCODING_FORMAT, Encoding
from .engine import (DEFAULT_MODEL_ID, MAX_PROMPTS_PER_QUERY, Engine, resolve_device,
                     resolve_model_dir)
from .finding import Finding
from .protocol import (Answer, Backend, BackendState, Capabilities, ConceptMatcher, ModelInfo,
                       Request)

__all__ = ["Engine", "Encoding", "Finding", "Answer", "Backend", "BackendState", "Capabilities",
           "ConceptMatcher", "ModelInfo", "Request", "DEFAULT_MODEL_ID", "ENCODING_FORMAT",
           "MAX_PROMPTS_PER_QUERY", "resolve_device", "resolve_model_dir"]
