"""What the lessons draw and run: figures, widgets and lesson-sized experiments, one module per topic.

Techniques live in their own modules (`course.sparse`, `course.recompute`, `course.parallel`, ...);
the lessons' own code lives here so that a technique's file holds only the technique.
"""
