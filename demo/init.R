## The R side of forward's demo (Rserve --RS-source demo/init.R, in OCAP mode with `oob enable`).
##
## It is the OCAP example from Rserve's documentation: a client that connects gets one capability,
## `auth`; calling it with the right user and password returns `parseEval`, which evaluates text.
## parseEval behaves like R's console: R itself prints every visible value, warnings follow the
## output the way the console shows them, an error stops the rest with R's message, and plots are
## drawn by R on a cairo PNG device. All of it goes to the browser while R works, as out-of-band
## (OOB) sends in the `list(stream, text)` form Rserve's own `console.oob` option uses, plus
## `list("console.plot", png_bytes, c(width, height))` for each new or changed plot page. The
## answer only says how it ended: list(status = "ok") or list(status = "error", error = text).
##
## parseEval runs any R code: this is a demo of the plumbing. A real application exposes only the
## functions it needs (see "In real applications" in Rserve's OCAP documentation).

library(Rserve)

## Everything but oc.init lives in a local environment, so that ls() in the page shows the user's
## own variables. Rserve forks one R process per connection: each session has its own copy.
oc.init <- local({
  demo.user <- Sys.getenv("FORWARD_DEMO_USER", "mike")
  demo.password <- Sys.getenv("FORWARD_DEMO_PASSWORD", "mypwd")

  ## One OOB message to the browser (needs Rserve's `oob enable`).
  send <- function(stream, payload, ...) {
    self.oobSend(list(stream, payload, ...))
    invisible(NULL)
  }

  ## ---- output --------------------------------------------------------------------------------
  ## Both output and messages are sunk into one raw connection while R evaluates, so R's own
  ## text (print(), cat(), an immediate warning) keeps its exact bytes and its order; what is new
  ## since the last flush is sent whenever something else (a message, a plot, the end of an
  ## expression) has to come after it.
  capture <- new.env()

  start.capture <- function() {
    capture$con <- rawConnection(raw(0), "w")
    capture$sent <- 0
    sink(capture$con)
    sink(capture$con, type = "message")
  }

  stop.capture <- function() {
    flush()
    # User code may have removed our sinks already (sink() in the page): only remove what is left.
    if (sink.number(type = "message") != 2L) sink(type = "message")
    if (sink.number() > 0L) sink()
    close(capture$con)
    capture$con <- NULL
  }

  ## The text written since the last flush.
  unsent <- function() {
    if (is.null(capture$con)) return("")
    bytes <- rawConnectionValue(capture$con)
    if (length(bytes) <= capture$sent) return("")
    new <- bytes[(capture$sent + 1):length(bytes)]
    capture$sent <- length(bytes)
    rawToChar(new)
  }

  flush <- function(stream = "console.out") {
    text <- unsent()
    if (nzchar(text)) send(stream, text)
  }

  ## R's own report of the warnings it kept for the expression ("Warning message:\nIn f() : w",
  ## "There were 12 warnings (use warnings() to see them)"), which also keeps them for warnings().
  ## R prints it after an error, so it begins with "In addition: "; without an error that goes.
  warnings.text <- function(after.error = FALSE) {
    flush()
    .Internal(printDeferredWarnings())
    text <- unsent()
    if (!after.error) text <- sub("^[^:\n]*: ", "", text)
    text
  }

  ## ---- plots ---------------------------------------------------------------------------------
  ## R draws on a cairo PNG device of the page's size whose own pages go to /dev/null: it only
  ## keeps the display list. A page is sent when it is done (a new page starts, in a loop too) or
  ## when an expression ends and it has changed; to send it, it is replayed on a second cairo PNG
  ## device writing a temporary file, which is read and removed at once.
  plots <- new.env()
  plots$device <- NULL # the device number
  plots$size <- c(width = 640L, height = 480L, ratio = 1) # CSS pixels, device pixels per CSS pixel
  plots$page <- 0L # counts pages begun on the device
  plots$sent <- NULL # list(page, display list, png) of the last page sent
  plots$busy <- FALSE # replaying: the hooks stay out of it

  device.args <- function() {
    s <- plots$size
    list(width = round(s[["width"]] * s[["ratio"]]), height = round(s[["height"]] * s[["ratio"]]),
         res = 96 * s[["ratio"]], type = "cairo")
  }

  ## options(device =): what plot() opens when no device is open.
  open.device <- function(...) {
    do.call(grDevices::png, c(list(filename = "/dev/null"), device.args()))
    grDevices::dev.control(displaylist = "enable")
    plots$device <- grDevices::dev.cur()
    plots$sent <- NULL
    invisible(NULL)
  }

  ours <- function() !is.null(plots$device) && plots$device %in% grDevices::dev.list()

  ## The page on our device, recorded (NULL when there is none or it is empty).
  snapshot <- function() {
    if (!ours()) return(NULL)
    current <- grDevices::dev.cur()
    if (current != plots$device) {
      grDevices::dev.set(plots$device)
      on.exit(grDevices::dev.set(current))
    }
    p <- grDevices::recordPlot()
    if (length(p[[1L]])) p else NULL
  }

  render <- function(p) {
    file <- tempfile("plot", fileext = ".png")
    on.exit(unlink(file))
    current <- grDevices::dev.cur()
    do.call(grDevices::png, c(list(filename = file), device.args()))
    tryCatch(grDevices::replayPlot(p), finally = {
      grDevices::dev.off()
      if (current %in% grDevices::dev.list()) grDevices::dev.set(current)
    })
    # A page with nothing drawn on it yet (grid.newpage() alone) leaves no file.
    if (!file.exists(file)) return(NULL)
    readBin(file, "raw", file.info(file)$size)
  }

  ## Sends the page on our device if it is new or has changed. A failure is reported as such,
  ## never as an error of the user's code (this also runs in the hooks of plot.new()).
  send.plot <- function() {
    if (plots$busy || is.null(capture$con)) return(invisible(NULL))
    plots$busy <- TRUE
    on.exit(plots$busy <- FALSE)
    tryCatch(send.page(), error = function(e) {
      flush()
      send("console.err", paste0("(the plot could not be sent: ", conditionMessage(e), ")\n"))
    })
  }

  send.page <- function() {
    p <- snapshot()
    if (is.null(p)) return(invisible(NULL))
    last <- plots$sent
    if (!is.null(last) && last$page == plots$page && identical(last$list, p[[1L]]))
      return(invisible(NULL))
    png <- render(p)
    if (is.null(png)) return(invisible(NULL))
    # par() and the like change the display list but not the picture.
    same <- !is.null(last) && last$page == plots$page && identical(last$png, png)
    plots$sent <- list(page = plots$page, list = p[[1L]], png = png)
    if (same) return(invisible(NULL))
    flush()
    send("console.plot", png, as.integer(plots$size[c("width", "height")]))
  }

  ## A new page is about to begin on our device: the one it replaces is done. With par(mfrow)
  ## plot.new() only starts a new page after the last figure of the layout.
  before.base.page <- function() {
    if (!ours() || grDevices::dev.cur() != plots$device || plots$busy) return(invisible(NULL))
    mfg <- graphics::par("mfg")
    if (graphics::par("new") || any(mfg[1:2] != mfg[3:4])) return(invisible(NULL))
    send.plot()
    plots$page <- plots$page + 1L
  }

  before.grid.page <- function() {
    if (!ours() || grDevices::dev.cur() != plots$device || plots$busy) return(invisible(NULL))
    send.plot()
    plots$page <- plots$page + 1L
  }

  ## The page's plot size: width in CSS pixels and the screen's device pixel ratio. When it
  ## changes, the device is opened again at the new size with the current page replayed on it.
  set.size <- function(display) {
    width <- suppressWarnings(as.numeric(display$width))
    ratio <- suppressWarnings(as.numeric(display$ratio))
    if (length(width) != 1L || is.na(width)) width <- plots$size[["width"]]
    if (length(ratio) != 1L || is.na(ratio)) ratio <- plots$size[["ratio"]]
    width <- round(min(max(width, 240), 1200))
    size <- c(width = width, height = round(width * 3 / 4), ratio = min(max(ratio, 1), 3))
    if (identical(size, plots$size)) return(invisible(NULL))
    p <- snapshot()
    plots$size <- size
    if (ours()) {
      current <- grDevices::dev.cur()
      grDevices::dev.off(plots$device)
      sent <- plots$sent
      open.device()
      plots$sent <- sent
      if (!is.null(p)) {
        plots$busy <- TRUE
        on.exit(plots$busy <- FALSE)
        # A plot that does not fit the new size ("figure margins too large") leaves the device
        # in a state nothing can be drawn in: a new blank one takes its place.
        replayed <- tryCatch({ grDevices::replayPlot(p); TRUE }, error = function(e) FALSE)
        if (!replayed) {
          grDevices::dev.off(plots$device)
          open.device()
        } else if (!is.null(sent) && sent$page == plots$page && identical(sent$list, p[[1L]])) {
          # The page the browser has, as it now looks: so that a par() alone sends nothing.
          plots$sent$png <- render(p)
        }
      }
      if (current != plots$device && current %in% grDevices::dev.list())
        grDevices::dev.set(current)
    }
  }

  ## ---- evaluation ----------------------------------------------------------------------------
  ## A condition signalled by code at the page's top level names our eval() as its call; the
  ## console has no call there ("Error: boom", not "Error in eval(...) : boom").
  top.call <- quote(eval(expr.from.page, .GlobalEnv))
  call.of <- function(cond) {
    call <- conditionCall(cond)
    if (identical(call, top.call)) NULL else call
  }

  ## "Error in f() : boom" or "Error: boom", broken after the colon when long, as R prints it.
  error.text <- function(e) {
    msg <- conditionMessage(e)
    call <- call.of(e)
    text <- if (is.null(call)) {
      paste0("Error: ", msg)
    } else {
      dcall <- deparse(call, nlines = 1L)[1L]
      first <- strsplit(msg, "\n", fixed = TRUE)[[1L]][1L]
      if (is.na(first)) first <- ""
      long <- 14L + nchar(dcall, type = "w") + nchar(first, type = "w") > 75L
      paste0("Error in ", dcall, " : ", if (long) "\n  ", msg)
    }
    if (!endsWith(text, "\n")) text <- paste0(text, "\n")
    text
  }

  ## One top-level expression, as the console runs it: value printed when visible, plot and
  ## warnings after it. Returns NULL, or the error's text.
  eval.one <- function(expr.from.page) {
    failed <- NULL
    tryCatch(
      withCallingHandlers({
        res <- withVisible(eval(expr.from.page, .GlobalEnv))
        if (res$visible) {
          if (isS4(res$value)) methods::show(res$value) else print(res$value)
        }
      },
      message = function(m) {
        flush()
        send("console.msg", conditionMessage(m))
        invokeRestart("muffleMessage")
      },
      warning = function(w) {
        # Kept by R itself (printed at once with options(warn = 1)); only one of the page's
        # top level loses our eval() as its call.
        if (!is.null(conditionCall(w)) && is.null(call.of(w))) {
          warning(simpleWarning(conditionMessage(w), NULL))
          invokeRestart("muffleWarning")
        }
      }),
      error = function(e) failed <<- e
    )
    send.plot()
    if (is.null(failed)) {
      text <- warnings.text()
      if (nzchar(text)) send("console.err", text)
      return(NULL)
    }
    flush()
    paste0(error.text(failed), warnings.text(after.error = TRUE))
  }

  ## A syntax error as the console reports it: the message and, in quotes, what was read of the
  ## expression up to the error (its last two lines).
  syntax.error <- function(e, text) {
    msg <- conditionMessage(e)
    where <- regmatches(msg, regexec("^<text>:([0-9]+):([0-9]+): ([^\n]*)", msg))[[1L]]
    if (!length(where)) return(paste0("Error: ", msg, "\n"))
    line <- as.integer(where[2L])
    column <- as.integer(where[3L])
    what <- where[4L]
    if (grepl("end of input|INCOMPLETE_STRING", what)) return("Error: unexpected end of input\n")
    lines <- strsplit(text, "\n", fixed = TRUE)[[1L]][seq_len(line)]
    lines[line] <- substr(lines[line], 1L, column)
    context <- utils::tail(lines, 2L)
    if (length(context) == 1L) {
      sprintf("Error: %s in \"%s\"\n", what, context)
    } else {
      sprintf("Error: %s in:\n\"%s\n%s\"\n", what, context[1L], context[2L])
    }
  }

  ## The text after the first expression of `text`, whose source reference is `ref`, from where
  ## R's console would go on reading: past the `;` or the end of the line that ends it.
  rest.after <- function(text, ref) {
    lines <- strsplit(text, "\n", fixed = TRUE)[[1L]]
    last <- ref[3L]
    tail <- charToRaw(lines[last])
    tail <- if (length(tail) > ref[4L]) rawToChar(tail[-seq_len(ref[4L])]) else ""
    tail <- sub("^[ \t]*;", "", tail)
    if (grepl("^[ \t]*(#.*)?$", tail)) tail <- NULL
    paste(c(tail, lines[-seq_len(last)]), collapse = "\n")
  }

  ## parseEval as in Rserve's OCAP example, but as R's console runs what is typed: expression by
  ## expression, each parsed when the one before has run, until the text ends or one fails.
  ## `display` is the page's plot size: list(width = CSS pixels, ratio = devicePixelRatio).
  parseEval <- function(text, display = NULL) {
    text <- paste(text, collapse = "\n")
    if (!is.null(display)) set.size(display)
    start.capture()
    on.exit(stop.capture())
    repeat {
      # Blank and comment lines are read and skipped, as the console does.
      text <- sub("^([ \t]*(#[^\n]*)?(\n|$))+", "", text)
      if (!nzchar(text)) return(list(status = "ok"))
      expr <- tryCatch(parse(text = text, n = 1L, keep.source = TRUE), error = function(e) e)
      if (inherits(expr, "error")) {
        return(list(status = "error", error = syntax.error(expr, text)))
      }
      if (!length(expr)) return(list(status = "ok"))
      error <- eval.one(expr[[1L]])
      if (!is.null(error)) return(list(status = "error", error = error))
      text <- rest.after(text, attr(expr, "srcref")[[1L]])
    }
  }

  auth <- function(user, pass) {
    if (identical(user, demo.user) && identical(pass, demo.password))
      list(parseEval = ocap(parseEval))
    else
      "sorry, unauthorized!"
  }

  options(device = open.device)
  setHook("before.plot.new", before.base.page)
  setHook("before.grid.newpage", before.grid.page)
  function() ocap(auth)
})
