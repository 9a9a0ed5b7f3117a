"""The torch corner: the only modules of qdtk that import torch or transformers. Capture
(`capture`), evaluation (`evaluate`), generation (`generate`), MoE experts (`experts`), qdtk's
own model families (`models`) and the packed Linear with its transformers quantizer (`nn`).
Importing this package imports no torch; its modules do."""
