"""The files qdtk reads and writes, at the bottom with the math: Hugging Face checkpoint folders
(`checkpoint`), statistics (`stats`), solutions (`solution`), the packed checkpoint (`packed`,
docs/FORMAT.md), expert tensor names (`experts`), calibration text sources (`calib`), honest bit
accounting (`bits`), atomic writes and fingerprints (`io`), input checks (`validate`). NumPy
only: no torch, no stage logic."""
