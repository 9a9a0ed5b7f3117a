"""The layer driver, above the math: the sweep over one Linear with compensation, feedback and
refinement (`layer`), and the layer solvers the quantize options name (`solvers`)."""
