// See gloo/context.h: the gloo types ProcessGroupGloo.hpp needs are declared there.
#pragma once
#include "gloo/context.h"
