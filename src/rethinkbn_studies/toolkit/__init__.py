"""What the studies build with: data, models, the training loop, corruptions, population
statistics the studies' way (``bn``), the toy RoI heads (``roi``) and shared helpers
(``common``)."""
