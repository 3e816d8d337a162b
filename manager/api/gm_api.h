/* The api layer: libgpumem's public functions (include/gpumem.h) over the engine. api.c holds
 * the basic entry points and what every other one needs first; buffers.c the named resizable
 * buffers; channel.c the readback and upload channels. Below: every lower layer. */
#ifndef GM_API_H
#define GM_API_H

#include "gm_report.h"

/* The manager started (library mode: on the real driver, with the exit report registered). */
int gm_api_ready(void);
/* The heap of the calling thread's current context. */
int gm_api_current_heap(gm_heap **out);

#endif
