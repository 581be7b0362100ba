"""Decode-pool sizing the composition root reads without importing a decoder.

No imports: `imgfleet status` and the other ops commands size the broker's prefetch from
this without loading cv2, pyvips or PIL.
"""

# Decodes kept in flight per pool process. Two leave a process idle while its next image
# crosses the event loop and the process boundary: on 2 cores, 2 per process scaled 1.65x
# from one process to two, 4 per process 1.96x (bench/RESULTS.md).
IN_FLIGHT_PER_PROCESS = 4
